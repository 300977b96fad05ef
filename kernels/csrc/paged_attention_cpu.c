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
 *   sliding_window:           > 0: each query sees only the last sliding_window tokens; 0: all
 *
 * One work item is a (sequence, KV head) pair, spread over OpenMP threads (the runtime is
 * the one torch loaded, so torch.set_num_threads applies); what a work item computes is
 * `attend_kv_head` of paged_attention.h, which the fused decode step shares.
 *
 * Returns 0, or 1 when a thread could not allocate its workspace (out is then undefined).
 */

#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "paged_attention.h"

/* The kernel for one element type; `bf16` is a constant in each exported wrapper, so the
 * compiler emits two specialised copies. Pointers are void: element size is 4 or 2. */
static inline __attribute__((always_inline)) int decode_attention(
    void *out, const void *query, const void *key_cache, const void *value_cache,
    const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t sliding_window, float scale, int bf16)
{
    const int64_t element_size = bf16 ? 2 : 4;
    const int64_t group = num_heads / num_kv_heads;
    int failed = 0;

#pragma omp parallel
    {
        /* Per thread: the core's scratch, then (bf16) the group's query widened. */
        const size_t floats = attend_workspace_floats(group, head_dim, block_size, bf16)
                            + (bf16 ? (size_t)(group * head_dim) : 0);
        float *workspace = malloc(sizeof(float) * floats);

#pragma omp for schedule(dynamic, 1)
        for (int64_t work = 0; work < num_seqs * num_kv_heads; ++work) {
            if (workspace == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            float *wide_q = workspace + attend_workspace_floats(group, head_dim, block_size, bf16);
            const int64_t seq = work / num_kv_heads;
            const int64_t kv_head = work % num_kv_heads;
            const int64_t q_offset = (seq * num_heads + kv_head * group) * head_dim;
            const float *q;
            if (bf16) {
                widen(wide_q, (const char *)query + q_offset * element_size, group * head_dim, 1);
                q = wide_q;
            } else {
                q = (const float *)query + q_offset;
            }
            attend_kv_head(workspace, q, key_cache, value_cache, block_tables + seq * block_table_stride,
                           seq_lens[seq], sliding_window, kv_head, group, num_kv_heads, head_dim, block_size, scale,
                           bf16, workspace);
            for (int64_t i = 0; i < group * head_dim; ++i) {
                if (bf16)
                    ((uint16_t *)out)[q_offset + i] = f32_to_bf16(workspace[i]);
                else
                    ((float *)out)[q_offset + i] = workspace[i];
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
    int64_t block_size, int64_t sliding_window, float scale)
{
    return decode_attention(out, query, key_cache, value_cache, block_tables, block_table_stride, seq_lens,
                            num_seqs, num_heads, num_kv_heads, head_dim, block_size, sliding_window, scale, 0);
}

/* The same over bfloat16 tensors (passed as their raw 16-bit patterns). */
int pagedserve_decode_attention_bf16(
    uint16_t *out, const uint16_t *query, const uint16_t *key_cache, const uint16_t *value_cache,
    const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t sliding_window, float scale)
{
    return decode_attention(out, query, key_cache, value_cache, block_tables, block_table_stride, seq_lens,
                            num_seqs, num_heads, num_kv_heads, head_dim, block_size, sliding_window, scale, 1);
}
