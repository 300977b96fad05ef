/*
 * Paged decode attention for CPUs: one query token per sequence, float32 or bfloat16, reading
 * K and V straight out of their blocks. bfloat16 inputs are widened to float32 as they are
 * read (exact) and everything is accumulated in float32; the output is rounded to bfloat16
 * once, to nearest even, as torch rounds.
 *
 * Why C and not torch ops: torch can only attend over contiguous K/V, so the torch path
 * (kernels/torch_ops.py) first gathers every sequence's blocks into a padded copy and then
 * runs SDPA on it. On a CPU decode is bound by memory bandwidth, and that gather reads and
 * writes the whole context once more than attention itself needs. This kernel reads each K
 * and V row once: in benchmarks/offline_throughput.py (embedded model, 2 cores) decode
 * attention took 10.3 s instead of 24.3 s, streaming K/V at 13-22 GB/s where a plain
 * 2-thread read of memory reaches 22 GB/s.
 *
 * Shapes and semantics are those of torch_ops.paged_decode_attention (all float tensors of
 * one dtype: pagedserve_decode_attention_f32 or pagedserve_decode_attention_bf16):
 *   out, query:               [num_seqs, num_heads, head_dim], contiguous
 *   key_cache, value_cache:   [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   block_tables:             int32 [num_seqs, block_table_stride] (row-major)
 *   seq_lens:                 int32 [num_seqs], tokens in the cache including this step's
 *
 * One work item is a (sequence, KV head) pair, spread over OpenMP threads (the runtime is
 * the one torch loaded, so torch.set_num_threads applies). A work item walks its blocks
 * once; each block's K/V rows, still in L1, serve every query head of the GQA group, with
 * the softmax computed online (running max and sum per query head, rescaled per block).
 * A bfloat16 block is widened into a float32 scratch copy first, once per (block, KV head),
 * so the query heads of the group share the conversion and the inner loops stay float32.
 *
 * Returns 0, or 1 when a thread could not allocate its workspace (out is then undefined).
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* `count` elements at `source` (float32 or bfloat16) as float32 in `target`. */
static inline void widen(float *target, const void *source, int64_t count, int bf16)
{
    if (bf16) {
        const uint16_t *bits = source;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i)
            target[i] = bf16_to_f32(bits[i]);
    } else {
        memcpy(target, source, sizeof(float) * (size_t)count);
    }
}

/* The kernel for one element type; `bf16` is a constant in each exported wrapper, so the
 * compiler emits two specialised copies. Pointers are void: element size is 4 or 2. */
static inline __attribute__((always_inline)) int decode_attention(
    void *out, const void *query, const void *key_cache, const void *value_cache,
    const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, float scale, int bf16)
{
    const int64_t element_size = bf16 ? 2 : 4;
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim; /* elements between a block's rows */
    const int64_t block_stride = block_size * token_stride;
    const char *keys = key_cache, *values = value_cache;
    int failed = 0;

#pragma omp parallel
    {
        /* Per thread: accumulators, running max and sum of each query head of a group, the
         * scores of one block; for bf16 also the group's query and one block's K and V
         * widened to float32. */
        const size_t floats = (size_t)(group * head_dim + 2 * group + block_size)
                            + (bf16 ? (size_t)(group * head_dim + 2 * block_size * head_dim) : 0);
        float *workspace = malloc(sizeof(float) * floats);

#pragma omp for schedule(dynamic, 1)
        for (int64_t work = 0; work < num_seqs * num_kv_heads; ++work) {
            if (workspace == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            float *acc = workspace;
            float *running_max = acc + group * head_dim;
            float *running_sum = running_max + group;
            float *scores = running_sum + group;
            float *wide_q = scores + block_size;          /* bf16 only */
            float *wide_k = wide_q + group * head_dim;    /* bf16 only: [block_size, head_dim] */
            float *wide_v = wide_k + block_size * head_dim;

            const int64_t seq = work / num_kv_heads;
            const int64_t kv_head = work % num_kv_heads;
            const int64_t seq_len = seq_lens[seq];
            const int32_t *table = block_tables + seq * block_table_stride;
            const int64_t q_offset = (seq * num_heads + kv_head * group) * head_dim;
            const float *q;
            if (bf16) {
                widen(wide_q, (const char *)query + q_offset * element_size, group * head_dim, 1);
                q = wide_q;
            } else {
                q = (const float *)query + q_offset;
            }

            for (int64_t g = 0; g < group; ++g) {
                running_max[g] = -FLT_MAX;
                running_sum[g] = 0.0f;
            }
            for (int64_t i = 0; i < group * head_dim; ++i)
                acc[i] = 0.0f;

            for (int64_t start = 0; start < seq_len; start += block_size) {
                const int64_t rows = seq_len - start < block_size ? seq_len - start : block_size;
                const int64_t block_offset = (int64_t)table[start / block_size] * block_stride + kv_head * head_dim;
                if (start + block_size < seq_len) {
                    /* Blocks lie anywhere in the pool, so the hardware prefetcher cannot
                     * guess the next one; asking for it now hides its latency behind this
                     * block's arithmetic (measured: about 1.4x faster from DRAM). */
                    const int64_t next = (int64_t)table[start / block_size + 1] * block_stride + kv_head * head_dim;
                    for (int64_t t = 0; t < block_size; ++t) {
                        for (int64_t d = 0; d < head_dim * element_size; d += 64) {
                            __builtin_prefetch(keys + (next + t * token_stride) * element_size + d);
                            __builtin_prefetch(values + (next + t * token_stride) * element_size + d);
                        }
                    }
                }
                const float *k_block, *v_block;
                int64_t row_stride;
                if (bf16) {
                    for (int64_t t = 0; t < rows; ++t) {
                        widen(wide_k + t * head_dim, keys + (block_offset + t * token_stride) * 2, head_dim, 1);
                        widen(wide_v + t * head_dim, values + (block_offset + t * token_stride) * 2, head_dim, 1);
                    }
                    k_block = wide_k, v_block = wide_v, row_stride = head_dim;
                } else {
                    k_block = (const float *)keys + block_offset;
                    v_block = (const float *)values + block_offset;
                    row_stride = token_stride;
                }
                for (int64_t g = 0; g < group; ++g) {
                    const float *qg = q + g * head_dim;
                    float block_max = -FLT_MAX;
                    for (int64_t t = 0; t < rows; ++t) {
                        const float *k = k_block + t * row_stride;
                        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                        for (int64_t d = 0; d < head_dim; ++d)
                            dot += qg[d] * k[d];
                        scores[t] = dot * scale;
                        block_max = scores[t] > block_max ? scores[t] : block_max;
                    }
                    const float new_max = block_max > running_max[g] ? block_max : running_max[g];
                    /* The first block has nothing to rescale. */
                    const float correction = start == 0 ? 0.0f : expf(running_max[g] - new_max);
                    float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
                    for (int64_t t = 0; t < rows; ++t) {
                        scores[t] = expf(scores[t] - new_max);
                        block_sum += scores[t];
                    }
                    running_sum[g] = running_sum[g] * correction + block_sum;
                    running_max[g] = new_max;
                    float *a = acc + g * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d)
                        a[d] *= correction;
                    for (int64_t t = 0; t < rows; ++t) {
                        const float *v = v_block + t * row_stride;
                        const float p = scores[t];
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; ++d)
                            a[d] += p * v[d];
                    }
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                /* An empty context (seq_len 0) attends to nothing: zeros, not 0/0. */
                const float inverse = running_sum[g] > 0.0f ? 1.0f / running_sum[g] : 0.0f;
                for (int64_t d = 0; d < head_dim; ++d) {
                    const float value = acc[g * head_dim + d] * inverse;
                    const int64_t index = q_offset + g * head_dim + d;
                    if (bf16)
                        ((uint16_t *)out)[index] = f32_to_bf16(value);
                    else
                        ((float *)out)[index] = value;
                }
            }
        }
        free(workspace);
    }
    return failed;
}

int pagedserve_decode_attention_f32(
    float *out, const float *query, const float *key_cache, const float *value_cache,
    const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, float scale)
{
    return decode_attention(out, query, key_cache, value_cache, block_tables, block_table_stride, seq_lens,
                            num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, 0);
}

/* The same over bfloat16 tensors (passed as their raw 16-bit patterns). */
int pagedserve_decode_attention_bf16(
    uint16_t *out, const uint16_t *query, const uint16_t *key_cache, const uint16_t *value_cache,
    const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, float scale)
{
    return decode_attention(out, query, key_cache, value_cache, block_tables, block_table_stride, seq_lens,
                            num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, 1);
}
