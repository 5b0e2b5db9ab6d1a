/* Whole decoder layers of a Llama-style model for one decode step, SelfExtend's attention included.
 *
 * Why: on the CPU a decode step of a small model is mostly Python.  transformers' eager layer is
 * ~20 module calls and ~60 tensor operations, each a few microseconds of dispatch, for a
 * 576-wide hidden state; 30 layers cost ~20 ms that way before any weight is read.  Here one call
 * runs every layer: RMSNorm, the q/k/v projections (fp32 or GGUF blocks), RoPE with the model's
 * own cos/sin tables, the write of the new key and value into the static cache (and of the new
 * grouped key into SelfExtend's mirror), SelfExtend's attention (common.h's loops, the softmax in
 * C), the output projection, the SiLU MLP and both residuals.
 *
 * The arithmetic is transformers' (same tables, same order of operations per element); only
 * sums are reassociated.  The caller (selfextend_llm/hf/native_step.py) checks that the model is
 * one this file implements and passes everything as plain pointers.
 *
 * Layouts: the hidden state x is (batch, hidden); q is (batch, heads, dim), heads h * rows + r
 * sharing KV head h; caches are (batch, kv_heads, capacity, dim), contiguous.
 */
#include "common.h"

enum { SE_F32 = 0, SE_Q4 = 1, SE_I8 = 2 };

/* A linear layer: an fp32 (out, in) weight, or GGUF block codes with scales: (out, in / 32, 16) bytes of
 * two 4-bit codes (SE_Q4) or (out, in / 32, 32) int8 codes (SE_I8). */
typedef struct {
    int64_t kind, out_features, in_features;
    const void *weight;
    const float *scale, *offset, *bias; /* offset, bias: NULL when absent */
} SeLinear;

typedef struct {
    const float *attn_norm, *mlp_norm;
    SeLinear q, k, v, o, gate, up, down;
    float *key, *value; /* the static cache's tensors */
    float *grouped;     /* SelfExtend's grouped-key mirror (same shape), or NULL: a plain layer */
    int64_t *length;    /* the cache layer's count of written slots (transformers' cumulative_length) */
} SeLayer;

typedef struct {
    int64_t batch, heads, kv_heads, dim, hidden, intermediate, capacity, slot, boundary;
    float eps, scale;
    const float *cos, *sin;     /* (batch, dim): RoPE at each row's position, as the model builds them */
    const float *q_cos, *q_sin; /* (batch, dim / 2): the query's turn to its grouped position */
    const float *k_cos, *k_sin; /* (batch, dim / 2): the new key's turn to its grouped position */
    const float *q_factor;      /* (batch): log scaling of grouped layers' queries, or NULL */
    const uint8_t *key_valid;   /* (batch, slot + 1): real keys, or NULL when none is padding */
    float *scratch;
    int64_t scratch_floats, chunk;
    int threads;
} SeStep;

#define SE_CHUNK 64 /* output features per task of a projection */

/* Floats of scratch a step needs (the Python side allocates it). */
int64_t se_step_scratch(int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t hidden,
                        int64_t intermediate, int64_t capacity, int64_t chunk)
{
    const int64_t rows = heads / kv_heads, chunks = (capacity + chunk - 1) / chunk;
    return batch * (hidden * 2 + heads * dim * 3 + kv_heads * dim * 2 + intermediate * 2 + heads * capacity)
           + batch * kv_heads * chunks * rows * dim;
}

static inline void rms_norm(int64_t n, const float *x, const float *weight, float eps, float *out)
{
    float ss = 0.0f;
    for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
    const float r = 1.0f / __builtin_sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

/* Several linear layers of one input (rows, in) in one parallel loop over their output chunks. */
static void linears(int count, const SeLinear *const *lin, float *const *out, int64_t rows, const float *x, int threads)
{
    float sums[SE_MAX_ROWS][SE_MAX_BLOCKS];
    const int64_t in = lin[0]->in_features, blocks = in / SE_BLOCK;
    int needs_sums = 0;
    int64_t first[4], total = 0;
    for (int l = 0; l < count; ++l) {
        needs_sums |= lin[l]->kind != SE_F32 && lin[l]->offset != 0;
        first[l] = total;
        total += (lin[l]->out_features + SE_CHUNK - 1) / SE_CHUNK;
    }
    if (needs_sums) block_sums(rows, blocks, x, sums);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < total; ++c) {
        int l = count - 1;
        while (first[l] > c) --l;
        const SeLinear *L = lin[l];
        const int64_t n_out = L->out_features;
        const int64_t o0 = (c - first[l]) * SE_CHUNK, o1 = o0 + SE_CHUNK < n_out ? o0 + SE_CHUNK : n_out;
        float *y = out[l];
        for (int64_t o = o0; o < o1; ++o) {
            if (L->kind == SE_F32) {
                const float *w = (const float *)L->weight + o * in;
                for (int64_t r = 0; r < rows; ++r) {
                    const float *xr = x + r * in;
                    float acc = 0.0f;
                    for (int64_t i = 0; i < in; ++i) acc += w[i] * xr[i];
                    y[r * n_out + o] = acc;
                }
            } else {
                const float *offset = L->offset == 0 ? 0 : L->offset + o * blocks;
                const float (*s)[SE_MAX_BLOCKS] = needs_sums ? (const float (*)[SE_MAX_BLOCKS])sums : 0;
                if (L->kind == SE_Q4)
                    quant_dot_q4(rows, blocks, (const uint8_t *)L->weight + o * (in / 2), L->scale + o * blocks, offset,
                                 x, s, y + o, n_out);
                else
                    quant_dot_i8(rows, blocks, (const int8_t *)L->weight + o * in, L->scale + o * blocks, offset, x, s,
                                 y + o, n_out);
            }
            if (L->bias != 0)
                for (int64_t r = 0; r < rows; ++r) y[r * n_out + o] += L->bias[o];
        }
    }
}

/* transformers' apply_rotary_pos_emb on one head: x * cos + rotate_half(x) * sin. */
static inline void rope(int64_t dim, float *x, const float *cos, const float *sin)
{
    const int64_t half = dim / 2;
    float out[512];
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < dim; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
    memcpy(x, out, sizeof(float) * (size_t)dim);
}

/* selfextend_llm.rope.rotate (the "half" layout): a rotated state turned by a further angle. */
static inline void turn(int64_t dim, const float *x, const float *cos, const float *sin, float *out)
{
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        out[i] = x[i] * cos[i] - x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
    }
}

/* One layer's attention for every row: scores, softmax, values (q, gq: (batch, heads, dim)). */
static void attend(const SeStep *s, const SeLayer *L, const float *q, const float *gq, float *scores, float *partial,
                   float *out)
{
    const int64_t kv = s->kv_heads, dim = s->dim, rows = s->heads / kv, n = s->slot + 1, cap = s->capacity;
    const int64_t boundary = L->grouped != 0 && s->boundary > 0 ? s->boundary : 0;
    const int64_t chunk = s->chunk, chunks = (n + chunk - 1) / chunk, tasks = s->batch * kv * chunks;
    const int64_t head_rows = s->batch * s->heads;
#pragma omp parallel num_threads(s->threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const Task task = task_of(t, chunks, chunk, n, kv);
            const int64_t base = (task.b * kv + task.h) * cap * dim;
            score_keys(task.j0, task.j1, boundary, rows, dim, n, q + task.bh * rows * dim, gq + task.bh * rows * dim,
                       L->key + base, L->grouped == 0 ? L->key + base : L->grouped + base, s->scale,
                       scores + task.bh * rows * n);
        }
#pragma omp for schedule(static)
        for (int64_t hr = 0; hr < head_rows; ++hr) {
            float *row = scores + hr * n;
            const uint8_t *valid = s->key_valid == 0 ? 0 : s->key_valid + (hr / s->heads) * n;
            float top = -3.0e38f;
            int any = 0;
            for (int64_t j = 0; j < n; ++j)
                if (valid == 0 || valid[j]) {
                    any = 1;
                    top = row[j] > top ? row[j] : top;
                }
            if (!any) { /* a row of padding only: zeros, as PyTorch's path gives */
                memset(row, 0, sizeof(float) * (size_t)n);
                continue;
            }
            float total = 0.0f;
            if (valid == 0)
                for (int64_t j = 0; j < n; ++j) total += (row[j] = se_exp(row[j] - top));
            else
                for (int64_t j = 0; j < n; ++j) total += (row[j] = valid[j] ? se_exp(row[j] - top) : 0.0f);
            const float inv = 1.0f / total;
            for (int64_t j = 0; j < n; ++j) row[j] *= inv;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const Task task = task_of(t, chunks, chunk, n, kv);
            sum_values(task.j0, task.j1, rows, dim, n, scores + task.bh * rows * n,
                       L->value + (task.b * kv + task.h) * cap * dim, partial + t * rows * dim);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < s->batch * kv; ++bh) {
            float *o = out + bh * rows * dim;
            memcpy(o, partial + bh * chunks * rows * dim, sizeof(float) * (size_t)(rows * dim));
            for (int64_t c = 1; c < chunks; ++c) {
                const float *p = partial + (bh * chunks + c) * rows * dim;
                for (int64_t i = 0; i < rows * dim; ++i) o[i] += p[i];
            }
        }
    }
}

/* Runs `count` layers on x (batch, hidden) in place.  Returns 0, or a negative code before doing
 * anything: -1 scratch too small, -2 a cache layer's length is not `slot`, -3 unsupported shape. */
int se_decode_layers(int64_t count, const SeLayer *layers, const SeStep *s, float *x)
{
    const int64_t B = s->batch, H = s->heads, KV = s->kv_heads, D = s->dim, hid = s->hidden, inter = s->intermediate;
    const int64_t n = s->slot + 1;
    if (B < 1 || B > SE_MAX_ROWS || D > 512 || D % 2 || H % KV || n > s->capacity || s->chunk < 1)
        return -3;
    if (se_step_scratch(B, H, KV, D, hid, inter, s->capacity, s->chunk) > s->scratch_floats) return -1;
    for (int64_t l = 0; l < count; ++l) {
        const SeLayer *L = &layers[l];
        if (*L->length != s->slot) return -2;
        const SeLinear *all[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int i = 0; i < 7; ++i)
            if (all[i]->kind != SE_F32 && (all[i]->in_features % SE_BLOCK || all[i]->in_features / SE_BLOCK > SE_MAX_BLOCKS))
                return -3;
    }
    float *h = s->scratch, *q = h + B * hid, *gq = q + B * H * D, *att = gq + B * H * D, *k = att + B * H * D;
    float *v = k + B * KV * D, *proj = v + B * KV * D, *gate = proj + B * hid, *up = gate + B * inter;
    float *scores = up + B * inter, *partial = scores + B * H * n;
    const int64_t half = D / 2;

    for (int64_t l = 0; l < count; ++l) {
        const SeLayer *L = &layers[l];
        for (int64_t b = 0; b < B; ++b) rms_norm(hid, x + b * hid, L->attn_norm, s->eps, h + b * hid);
        {
            const SeLinear *lin[] = {&L->q, &L->k, &L->v};
            float *out[] = {q, k, v};
            linears(3, lin, out, B, h, s->threads);
        }
        for (int64_t b = 0; b < B; ++b) {
            const float *cos = s->cos + b * D, *sin = s->sin + b * D;
            const float factor = L->grouped != 0 && s->q_factor != 0 ? s->q_factor[b] : 1.0f;
            for (int64_t hd = 0; hd < H; ++hd) {
                float *qh = q + (b * H + hd) * D;
                rope(D, qh, cos, sin);
                if (factor != 1.0f)
                    for (int64_t i = 0; i < D; ++i) qh[i] *= factor;
                if (L->grouped != 0) turn(D, qh, s->q_cos + b * half, s->q_sin + b * half, gq + (b * H + hd) * D);
            }
            for (int64_t hd = 0; hd < KV; ++hd) {
                float *kh = k + (b * KV + hd) * D;
                rope(D, kh, cos, sin);
                const int64_t at = ((b * KV + hd) * s->capacity + s->slot) * D;
                memcpy(L->key + at, kh, sizeof(float) * (size_t)D);
                memcpy(L->value + at, v + (b * KV + hd) * D, sizeof(float) * (size_t)D);
                if (L->grouped != 0) turn(D, kh, s->k_cos + b * half, s->k_sin + b * half, L->grouped + at);
            }
        }
        attend(s, L, q, L->grouped != 0 ? gq : q, scores, partial, att);
        {
            const SeLinear *lin[] = {&L->o};
            float *out[] = {proj};
            linears(1, lin, out, B, att, s->threads);
        }
        for (int64_t i = 0; i < B * hid; ++i) x[i] += proj[i];
        for (int64_t b = 0; b < B; ++b) rms_norm(hid, x + b * hid, L->mlp_norm, s->eps, h + b * hid);
        {
            const SeLinear *lin[] = {&L->gate, &L->up};
            float *out[] = {gate, up};
            linears(2, lin, out, B, h, s->threads);
        }
        for (int64_t i = 0; i < B * inter; ++i) gate[i] = gate[i] / (1.0f + se_exp(-gate[i])) * up[i];
        {
            const SeLinear *lin[] = {&L->down};
            float *out[] = {proj};
            linears(1, lin, out, B, gate, s->threads);
        }
        for (int64_t i = 0; i < B * hid; ++i) x[i] += proj[i];
        *L->length += 1;
    }
    return 0;
}
