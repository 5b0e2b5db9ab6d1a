/* A few rows times a weight kept in GGUF's 32-weight blocks (Q4_0 / Q4_1 two codes a byte, Q8_0).
 *
 * y[r, o] = sum_b scale[o, b] * <codes[o, b, :], x[r, b, :]> + offset[o, b] * sum(x[r, b, :])
 *
 * Decoding multiplies one row by every weight of the model, so the call is bound by reading the
 * codes.  The per-output loop is common.h's quant_dot_*; the offsets' term is one dot product
 * with the input's block sums.  Output rows are split over threads in chunks.
 */
#include "common.h"

#define PRODUCT(NAME, CODE_T, CODE_BYTES, DOT)                                                                  \
void NAME(int64_t rows, int64_t out_features, int64_t blocks, const CODE_T *codes, const float *scale, \
          const float *offset, const float *x, float *y, int64_t chunk, int threads)                 \
{                                                                                                     \
    float sums[SE_MAX_ROWS][SE_MAX_BLOCKS];                                                           \
    const int use_sums = offset != 0 && blocks <= SE_MAX_BLOCKS;                                      \
    if (use_sums) block_sums(rows, blocks, x, sums);                                                  \
    const int64_t chunks = (out_features + chunk - 1) / chunk;                                        \
    (void)threads;                                                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int64_t c = 0; c < chunks; ++c) {                                                            \
        const int64_t o1 = (c + 1) * chunk < out_features ? (c + 1) * chunk : out_features;          \
        for (int64_t o = c * chunk; o < o1; ++o)                                                      \
            DOT(rows, blocks, codes + o * blocks * CODE_BYTES, scale + o * blocks,                      \
                offset == 0 ? 0 : offset + o * blocks, x, use_sums ? (const float (*)[SE_MAX_BLOCKS])sums : 0, \
                y + o, out_features);                                                                 \
    }                                                                                                 \
}

PRODUCT(se_product_q4, uint8_t, 16, quant_dot_q4)
PRODUCT(se_product_i8, int8_t, SE_BLOCK, quant_dot_i8)
