/* SelfExtend's decode step on the CPU: one query per sequence over the whole cache.
 *
 * A decode step reads every cached key and value once, so on the CPU it is bound by memory
 * reads.  The two loops below read each key (then each value) row once for all the query heads
 * of its KV head, across all threads, at close to the machine's read bandwidth.  The softmax
 * between them stays in PyTorch: it touches only heads x keys floats.
 *
 * Layout: a head's rows are contiguous (row j at base + j * dim); batch and head strides are
 * passed in elements.  Queries are (batch, kv_heads, rows, dim), contiguous, where `rows` are
 * the query heads that share one KV head.  Built with reassociation allowed so that the dot
 * products vectorise: results differ from a matrix product only in summation order.
 */
#include <stdint.h>
#include <string.h>

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

/* scores[b, h, r, j] = scale * <q, k_j>, where keys j < boundary are scored grouped (the
 * grouped query against the grouped key) and the rest plainly.  Work is split into
 * batch x kv_heads x ceil(n / chunk) tasks. */
void se_decode_scores(int64_t batch, int64_t kv_heads, int64_t rows, int64_t dim, int64_t n, int64_t boundary,
                      const float *query, const float *grouped_query,
                      const float *key, int64_t key_sb, int64_t key_sh,
                      const float *grouped_key, int64_t grouped_sb, int64_t grouped_sh,
                      float scale, int64_t chunk, int threads, float *scores)
{
    const int64_t chunks = (n + chunk - 1) / chunk;
    const int64_t tasks = batch * kv_heads * chunks;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tasks; ++t) {
        const Task task = task_of(t, chunks, chunk, n, kv_heads);
        const int64_t bh = task.bh, b = task.b, h = task.h, j0 = task.j0, j1 = task.j1;
        const float *q = query + bh * rows * dim, *gq = grouped_query + bh * rows * dim;
        float *out = scores + bh * rows * n;
        for (int64_t j = j0; j < j1; ++j) {
            const int far = j < boundary;
            const float *k = far ? grouped_key + b * grouped_sb + h * grouped_sh + j * dim
                                 : key + b * key_sb + h * key_sh + j * dim;
            const float *qq = far ? gq : q;
            for (int64_t r = 0; r < rows; ++r) {
                const float *qr = qq + r * dim;
                float acc = 0.0f;
                for (int64_t i = 0; i < dim; ++i) acc += qr[i] * k[i];
                out[r * n + j] = acc * scale;
            }
        }
    }
}

/* partial[bh, c, r, :] = sum over keys j of chunk c of probs[b, h, r, j] * v_j; the caller sums
 * over c (chunks split the keys so that every thread has work at a small batch). */
void se_decode_values(int64_t batch, int64_t kv_heads, int64_t rows, int64_t dim, int64_t n,
                      const float *probs, const float *value, int64_t value_sb, int64_t value_sh,
                      int64_t chunk, int threads, float *partial)
{
    const int64_t chunks = (n + chunk - 1) / chunk;
    const int64_t tasks = batch * kv_heads * chunks;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tasks; ++t) {
        const Task task = task_of(t, chunks, chunk, n, kv_heads);
        const int64_t bh = task.bh, b = task.b, h = task.h, j0 = task.j0, j1 = task.j1;
        float *acc = partial + t * rows * dim;
        memset(acc, 0, sizeof(float) * (size_t)(rows * dim));
        const float *p = probs + bh * rows * n;
        for (int64_t j = j0; j < j1; ++j) {
            const float *v = value + b * value_sb + h * value_sh + j * dim;
            for (int64_t r = 0; r < rows; ++r) {
                const float w = p[r * n + j];
                float *a = acc + r * dim;
                for (int64_t i = 0; i < dim; ++i) a[i] += w * v[i];
            }
        }
    }
}
