/* Rows times a weight kept in GGUF's 32-weight blocks (Q4_0 / Q4_1 two codes a byte, Q8_0).
 *
 * y[r, o] = sum_b scale[o, b] * <codes[o, b, :], x[r, b, :]> + offset[o, b] * sum(x[r, b, :])
 *
 * Decoding multiplies one row by every weight of the model, so the call is bound by reading the
 * codes.  The per-output loop is common.h's quant_dot_*, SE_MAX_ROWS rows at a time (their partial
 * sums live in registers); with more rows (a batched decode step, up to SE_MAX_PRODUCT_ROWS) each
 * output's codes are read from memory once and the later groups of rows find them in L1, where
 * calling four rows at a time from Python read every weight once per group (16 rows: four passes over
 * ~100 MB of codes).  Each row's arithmetic is the same whatever group it is in, so the result is
 * bit for bit the four-at-a-time one.  The offsets' term is one dot product with the input's block
 * sums.  Output rows are split over threads in chunks.
 */
#include <stdlib.h>

#include "common.h"

#define PRODUCT(NAME, CODE_T, CODE_BYTES, DOT)                                                                  \
int NAME(int64_t rows, int64_t out_features, int64_t blocks, const CODE_T *codes, const float *scale,  \
         const float *offset, const float *x, float *y, int64_t chunk, int threads)                  \
{                                                                                                     \
    if (rows < 1 || rows > SE_MAX_PRODUCT_ROWS) return -3;                                            \
    const int use_sums = offset != 0 && blocks <= SE_MAX_BLOCKS;                                      \
    float (*sums)[SE_MAX_BLOCKS] = 0;                                                                 \
    if (use_sums) {                                                                                   \
        sums = malloc(sizeof(float) * SE_MAX_BLOCKS * (size_t)rows);                                  \
        if (sums == 0) return -1;                                                                     \
        block_sums(rows, blocks, x, sums);                                                            \
    }                                                                                                 \
    const int64_t chunks = (out_features + chunk - 1) / chunk, width = blocks * SE_BLOCK;             \
    (void)threads;                                                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int64_t c = 0; c < chunks; ++c) {                                                            \
        const int64_t o1 = (c + 1) * chunk < out_features ? (c + 1) * chunk : out_features;          \
        for (int64_t o = c * chunk; o < o1; ++o)                                                      \
            for (int64_t r0 = 0; r0 < rows; r0 += SE_MAX_ROWS)                                        \
                DOT(rows - r0 < SE_MAX_ROWS ? rows - r0 : SE_MAX_ROWS, blocks,                        \
                    codes + o * blocks * CODE_BYTES, scale + o * blocks,                              \
                    offset == 0 ? 0 : offset + o * blocks, x + r0 * width,                            \
                    use_sums ? (const float (*)[SE_MAX_BLOCKS])(sums + r0) : 0,                       \
                    y + r0 * out_features + o, out_features);                                         \
    }                                                                                                 \
    free(sums);                                                                                       \
    return 0;                                                                                         \
}

PRODUCT(se_product_q4, uint8_t, 16, quant_dot_q4)
PRODUCT(se_product_i8, int8_t, SE_BLOCK, quant_dot_i8)
