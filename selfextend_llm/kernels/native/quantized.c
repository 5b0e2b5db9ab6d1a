/* A few rows times a weight kept in GGUF's 32-weight blocks (Q4_0 / Q4_1 as one byte a code, Q8_0).
 *
 * y[r, o] = sum_b scale[o, b] * <codes[o, b, :], x[r, b, :]> + offset[o, b] * sum(x[r, b, :])
 *
 * Decoding multiplies one row by every weight of the model, so the call is bound by reading the
 * codes.  Each output row keeps 32 partial sums per input row (the scale applied per block, in
 * vector registers) and reduces them once at the end; the offsets' term is one dot product with
 * the input's block sums.  Output rows are split over threads in chunks.
 */
#include <stdint.h>

#define MAX_ROWS 4
#define BLOCK 32

#define PRODUCT(NAME, CODE_T)                                                                         \
void NAME(int64_t rows, int64_t out_features, int64_t blocks, const CODE_T *codes, const float *scale, \
          const float *offset, const float *x, float *y, int64_t chunk, int threads)                 \
{                                                                                                     \
    float xsum[MAX_ROWS][1024];                                                                       \
    const int64_t width = blocks * BLOCK;                                                             \
    const int sums = offset != 0 && blocks <= 1024;                                                   \
    if (sums)                                                                                         \
        for (int64_t r = 0; r < rows; ++r)                                                            \
            for (int64_t b = 0; b < blocks; ++b) {                                                    \
                float s = 0.0f;                                                                       \
                for (int i = 0; i < BLOCK; ++i) s += x[r * width + b * BLOCK + i];                    \
                xsum[r][b] = s;                                                                       \
            }                                                                                         \
    const int64_t chunks = (out_features + chunk - 1) / chunk;                                        \
    (void)threads;                                                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int64_t c = 0; c < chunks; ++c) {                                                            \
        const int64_t o1 = (c + 1) * chunk < out_features ? (c + 1) * chunk : out_features;          \
        for (int64_t o = c * chunk; o < o1; ++o) {                                                    \
            float acc[MAX_ROWS][BLOCK] = {{0.0f}};                                                    \
            const CODE_T *w = codes + o * width;                                                      \
            const float *s = scale + o * blocks;                                                      \
            if (rows == 1) /* decoding: the partial sums stay in registers */                          \
                for (int64_t b = 0; b < blocks; ++b) {                                                \
                    const CODE_T *wb = w + b * BLOCK;                                                 \
                    const float *xb = x + b * BLOCK;                                                  \
                    for (int i = 0; i < BLOCK; ++i) acc[0][i] += s[b] * ((float)wb[i] * xb[i]);       \
                }                                                                                     \
            else                                                                                      \
            for (int64_t b = 0; b < blocks; ++b) {                                                    \
                const CODE_T *wb = w + b * BLOCK;                                                     \
                for (int64_t r = 0; r < rows; ++r) {                                                  \
                    const float *xb = x + r * width + b * BLOCK;                                      \
                    for (int i = 0; i < BLOCK; ++i) acc[r][i] += s[b] * ((float)wb[i] * xb[i]);       \
                }                                                                                     \
            }                                                                                         \
            for (int64_t r = 0; r < rows; ++r) {                                                      \
                float total = 0.0f;                                                                   \
                for (int i = 0; i < BLOCK; ++i) total += acc[r][i];                                   \
                if (offset != 0) {                                                                    \
                    const float *m = offset + o * blocks;                                             \
                    if (sums)                                                                         \
                        for (int64_t b = 0; b < blocks; ++b) total += m[b] * xsum[r][b];              \
                    else                                                                              \
                        for (int64_t b = 0; b < blocks; ++b)                                          \
                            for (int i = 0; i < BLOCK; ++i) total += m[b] * x[r * width + b * BLOCK + i]; \
                }                                                                                     \
                y[r * out_features + o] = total;                                                      \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

PRODUCT(se_product_u8, uint8_t)
PRODUCT(se_product_i8, int8_t)
