/* SelfExtend's decode step on the CPU: one query per sequence over the whole cache.
 *
 * A decode step reads every cached key and value once, so on the CPU it is bound by memory
 * reads.  The two loops below (common.h's score_keys and sum_values) read each key (then each
 * value) row once for all the query heads of its KV head, across all threads, at close to the
 * machine's read bandwidth.  The softmax between them stays in PyTorch here; step.c, which runs
 * whole decoder layers, does it in C.
 *
 * Layout: a head's rows are contiguous (row j at base + j * dim); batch and head strides are
 * passed in elements.  Queries are (batch, kv_heads, rows, dim), contiguous, where `rows` are
 * the query heads that share one KV head.
 */
#include "common.h"

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
        score_keys(task.j0, task.j1, boundary, rows, dim, n, query + task.bh * rows * dim,
                   grouped_query + task.bh * rows * dim, key + task.b * key_sb + task.h * key_sh,
                   grouped_key + task.b * grouped_sb + task.h * grouped_sh, scale, scores + task.bh * rows * n);
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
        sum_values(task.j0, task.j1, rows, dim, n, probs + task.bh * rows * n,
                   value + task.b * value_sb + task.h * value_sh, partial + t * rows * dim);
    }
}
