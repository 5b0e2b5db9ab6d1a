/* Shared by the C kernels: how the cache is split into tasks, and the loops that read keys,
 * values and quantised weights.  Each loop reads its rows once for every query (or input) row
 * that needs them, so the callers are bound by memory reads, not by instructions.
 *
 * Built with reassociation allowed (see __init__.py), so the sums vectorise: results differ
 * from PyTorch's only in summation order.
 */
#ifndef SELFEXTEND_NATIVE_COMMON_H
#define SELFEXTEND_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

/* Weights per block in every supported GGUF format. */
#define SE_BLOCK 32
/* Input rows a quantised product takes at a time (its partial sums live in registers). */
#define SE_MAX_ROWS 4
/* Input rows one call of quantized.c's product takes (SE_MAX_ROWS at a time; a batched decode step). */
#define SE_MAX_PRODUCT_ROWS 32
/* Blocks per input row whose sums are precomputed (in_features up to 32,768). */
#define SE_MAX_BLOCKS 1024

/* Task t of batch x kv_heads x chunks: its (batch, head) and its keys [j0, j1). */
typedef struct { int64_t bh, b, h, j0, j1; } Task;

static inline Task task_of(int64_t t, int64_t chunks, int64_t chunk, int64_t n, int64_t kv_heads)
{
    Task task;
    task.bh = t / chunks;
    task.b = task.bh / kv_heads;
    task.h = task.bh % kv_heads;
    task.j0 = (t % chunks) * chunk;
    task.j1 = task.j0 + chunk < n ? task.j0 + chunk : n;
    return task;
}

/* out[r * n + j] = scale * <q_r, k_j> for keys [j0, j1) of one KV head: keys before `boundary`
 * are the grouped ones (grouped query `gq` against `grouped`), the rest plain (`q` against `key`). */
static inline void score_keys(int64_t j0, int64_t j1, int64_t boundary, int64_t rows, int64_t dim, int64_t n,
                              const float *q, const float *gq, const float *key, const float *grouped, float scale,
                              float *out)
{
    for (int64_t j = j0; j < j1; ++j) {
        const int far = j < boundary;
        const float *k = far ? grouped + j * dim : key + j * dim;
        const float *qq = far ? gq : q;
        for (int64_t r = 0; r < rows; ++r) {
            const float *qr = qq + r * dim;
            float acc = 0.0f;
            for (int64_t i = 0; i < dim; ++i) acc += qr[i] * k[i];
            out[r * n + j] = acc * scale;
        }
    }
}

/* acc[r, :] = sum over keys j in [j0, j1) of probs[r * n + j] * v_j, for one KV head. */
static inline void sum_values(int64_t j0, int64_t j1, int64_t rows, int64_t dim, int64_t n, const float *probs,
                              const float *value, float *acc)
{
    memset(acc, 0, sizeof(float) * (size_t)(rows * dim));
    for (int64_t j = j0; j < j1; ++j) {
        const float *v = value + j * dim;
        for (int64_t r = 0; r < rows; ++r) {
            const float w = probs[r * n + j];
            float *a = acc + r * dim;
            for (int64_t i = 0; i < dim; ++i) a[i] += w * v[i];
        }
    }
}

/* Block sums of each input row (the offset term of Q4_1 is one dot product with them). */
static inline void block_sums(int64_t rows, int64_t blocks, const float *x, float (*sums)[SE_MAX_BLOCKS])
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < blocks; ++b) {
            float s = 0.0f;
            for (int i = 0; i < SE_BLOCK; ++i) s += x[r * blocks * SE_BLOCK + b * SE_BLOCK + i];
            sums[r][b] = s;
        }
}

/* total plus row r's offsets' term of a Q4_1 product, sum_b offset[b] * sum(x[r, b, :]), added onto it in block
 * order: from the precomputed block sums, or summed from x where there are none (wider inputs); total alone where
 * the format has no offsets. */
static inline float with_offsets(float total, int64_t r, int64_t blocks, const float *offset, const float *x,
                                 const float (*sums)[SE_MAX_BLOCKS])
{
    if (offset == 0) return total;
    if (sums != 0)
        for (int64_t b = 0; b < blocks; ++b) total += offset[b] * sums[r][b];
    else
        for (int64_t b = 0; b < blocks; ++b)
            for (int i = 0; i < SE_BLOCK; ++i) total += offset[b] * x[(r * blocks + b) * SE_BLOCK + i];
    return total;
}

/* y[r * y_stride] = sum_b scale[b] * <codes[b, :], x[r, b, :]> + offset[b] * sum(x[r, b, :]) for one
 * output feature of one-code-a-byte blocks (Q8_0): 32 partial sums per input row, the scale applied per block, one reduction at
 * the end.  `sums` (from block_sums) may be 0: the offsets' term is then summed from x. */
#define SE_QUANT_DOT(NAME, CODE_T)                                                                      \
static inline void NAME(int64_t rows, int64_t blocks, const CODE_T *codes, const float *scale,           \
                        const float *offset, const float *x, const float (*sums)[SE_MAX_BLOCKS],          \
                        float *y, int64_t y_stride)                                                     \
{                                                                                                       \
    const int64_t width = blocks * SE_BLOCK;                                                            \
    float acc[SE_MAX_ROWS][SE_BLOCK] = {{0.0f}};                                                        \
    if (rows == 1) /* decoding: the partial sums stay in registers */                                    \
        for (int64_t b = 0; b < blocks; ++b) {                                                          \
            const CODE_T *wb = codes + b * SE_BLOCK;                                                    \
            const float *xb = x + b * SE_BLOCK;                                                         \
            for (int i = 0; i < SE_BLOCK; ++i) acc[0][i] += scale[b] * ((float)wb[i] * xb[i]);          \
        }                                                                                               \
    else                                                                                                \
        for (int64_t b = 0; b < blocks; ++b) {                                                          \
            const CODE_T *wb = codes + b * SE_BLOCK;                                                    \
            for (int64_t r = 0; r < rows; ++r) {                                                        \
                const float *xb = x + r * width + b * SE_BLOCK;                                         \
                for (int i = 0; i < SE_BLOCK; ++i) acc[r][i] += scale[b] * ((float)wb[i] * xb[i]);      \
            }                                                                                           \
        }                                                                                               \
    for (int64_t r = 0; r < rows; ++r) {                                                                \
        float total = 0.0f;                                                                             \
        for (int i = 0; i < SE_BLOCK; ++i) total += acc[r][i];                                          \
        y[r * y_stride] = with_offsets(total, r, blocks, offset, x, sums);                              \
    }                                                                                                   \
}

SE_QUANT_DOT(quant_dot_i8, int8_t)

/* The same for 4-bit codes kept two a byte, as GGUF stores them (byte i of a block: weight i in the
 * low nibble, weight i + 16 in the high one): half the bytes of one code a byte, so decoding (bound
 * by reading the codes) runs faster.  Q4_1 (offset != 0) has codes q in 0..15; Q4_0 (offset == 0)
 * has q - 8.  The arithmetic is quant_dot_i8's, lane for lane: acc[r][i] += scale[b] * (q_i * x_i)
 * over 32 lanes, then one reduction; explicit vectors because compilers unpack nibbles poorly
 * (measured on 2 cores, every projection of the default model: plain C 6.7 ms, AVX-512 2.4 ms,
 * one code a byte 4.4 ms). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
static inline void quant_dot_q4(int64_t rows, int64_t blocks, const uint8_t *codes, const float *scale,
                                const float *offset, const float *x, const float (*sums)[SE_MAX_BLOCKS], float *y,
                                int64_t y_stride)
{
    const int64_t width = blocks * SE_BLOCK;
    const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(offset == 0 ? 8 : 0);
    __m512 acc[SE_MAX_ROWS][2];
    for (int64_t r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(codes + b * 16));
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(v, low), eight);
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low), eight);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
        const __m512 s = _mm512_set1_ps(scale[b]);
        for (int64_t r = 0; r < rows; ++r) {
            const float *xb = x + r * width + b * SE_BLOCK;
            acc[r][0] = _mm512_fmadd_ps(s, _mm512_mul_ps(q0, _mm512_loadu_ps(xb)), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(s, _mm512_mul_ps(q1, _mm512_loadu_ps(xb + 16)), acc[r][1]);
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        float total = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        y[r * y_stride] = with_offsets(total, r, blocks, offset, x, sums);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline void quant_dot_q4(int64_t rows, int64_t blocks, const uint8_t *codes, const float *scale,
                                const float *offset, const float *x, const float (*sums)[SE_MAX_BLOCKS], float *y,
                                int64_t y_stride)
{
    const int64_t width = blocks * SE_BLOCK;
    const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(offset == 0 ? 8 : 0);
    __m256 acc[SE_MAX_ROWS][4];
    for (int64_t r = 0; r < rows; ++r)
        for (int k = 0; k < 4; ++k) acc[r][k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(codes + b * 16));
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(v, low), eight);
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low), eight);
        __m256 q[4];
        q[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        q[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        q[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        q[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        const __m256 s = _mm256_set1_ps(scale[b]);
        for (int64_t r = 0; r < rows; ++r) {
            const float *xb = x + r * width + b * SE_BLOCK;
            for (int k = 0; k < 4; ++k)
                acc[r][k] = _mm256_fmadd_ps(s, _mm256_mul_ps(q[k], _mm256_loadu_ps(xb + 8 * k)), acc[r][k]);
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        float lanes[8], total = 0.0f;
        _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
        for (int i = 0; i < 8; ++i) total += lanes[i];
        y[r * y_stride] = with_offsets(total, r, blocks, offset, x, sums);
    }
}
#else
static inline void quant_dot_q4(int64_t rows, int64_t blocks, const uint8_t *codes, const float *scale,
                                const float *offset, const float *x, const float (*sums)[SE_MAX_BLOCKS], float *y,
                                int64_t y_stride)
{
    const int64_t width = blocks * SE_BLOCK;
    const int shift = offset == 0 ? 8 : 0;
    float acc[SE_MAX_ROWS][SE_BLOCK] = {{0.0f}};
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t *wb = codes + b * 16;
        float q[SE_BLOCK];
        for (int i = 0; i < 16; ++i) {
            q[i] = (float)((wb[i] & 15) - shift);
            q[i + 16] = (float)((wb[i] >> 4) - shift);
        }
        for (int64_t r = 0; r < rows; ++r) {
            const float *xb = x + r * width + b * SE_BLOCK;
            for (int i = 0; i < SE_BLOCK; ++i) acc[r][i] += scale[b] * (q[i] * xb[i]);
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        float total = 0.0f;
        for (int i = 0; i < SE_BLOCK; ++i) total += acc[r][i];
        y[r * y_stride] = with_offsets(total, r, blocks, offset, x, sums);
    }
}
#endif

/* exp(x) for x <= 88: 2^n * p(r) with r = x - n ln 2 (Cephes' polynomial, within ~2 ulp of expf).
 * Plain arithmetic, so the softmax and SiLU loops that call it vectorise. */
static inline float se_exp(float x)
{
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#endif
