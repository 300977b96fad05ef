/*
 * A whole decode step of a Llama-family decoder with 4-bit weights in one C call, for CPUs:
 * a few sequences, one new token each, from their embeddings to the final norm.
 *
 * Why: at batch 1 the embedded model's 30 layers run ~600 small torch ops a step, and on a
 * 2-core CPU their dispatch costs about as much as the matmuls themselves (measured: a
 * 9.6 ms step of which the int4 matmuls and the LM head are ~5 ms). Here a step is one
 * OpenMP parallel region: the matmuls split their 64-row weight blocks over the threads
 * (q4_matmul.h), attention splits (sequence, KV head) pairs (paged_attention.h), and the
 * per-token work between them (norms, RoPE, the cache write, SiLU) is a few hundred floats
 * done by one thread. The LM head and sampling stay in torch.
 *
 * Numerics: activations stay float32 from the embedding to the final norm (the residual
 * stream included), where the torch path rounds every op to the model dtype; the KV cache
 * gets the model dtype, as the torch path writes it. In a bfloat16 model on a CPU with
 * AVX512-BF16 each matmul's input is rounded to bfloat16, as torch's int4 kernel rounds it,
 * for dot products that take two columns per instruction (q4_matmul.h: 1.4x the float32
 * FMA path at 1 row, 1.7x at 8). So in bfloat16 this is closer to the float32 reference than
 * the torch path, not bit-equal to it.
 *
 * Weights: every projection 4-bit in torch's CPU int4 layout (q4_matmul.h) with rows a
 * multiple of 64, fused q/k/v and gate/up as the torch model keeps them; norms, RoPE tables,
 * caches, input and output in the model dtype (float32 or bfloat16, `bf16`).
 *
 *   embedded, out:           [rows, hidden]
 *   cos, sin:                [rows, head_dim / 2], each token's position looked up
 *   slot_mapping:            int64 [num_kv_groups, rows]: each new token's cache slot in
 *                            each KV group (< 0: not written)
 *   block_tables:            int32 [num_kv_groups, rows, block_table_stride]
 *   seq_lens:                int32 [rows] (this token included)
 *
 * KV groups: layers that share an attention window share block tables (the scheduler's
 * hybrid KV cache: a sliding-window group frees the blocks its window has left, so its
 * tables and slots differ from the global layers'). Each layer names its group and its
 * window (0: none; else it attends to the last sliding_window tokens, paged_attention.h).
 *
 * Returns 0; 1 when a slot is past the cache (nothing computed); 2 when memory for the
 * activations could not be allocated.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "paged_attention.h"
#include "q4_matmul.h"

typedef struct {
    const uint8_t *packed;             /* torch's int4pack layout: [rows / 64][cols][32] bytes */
    const uint16_t *scales_and_zeros;  /* bfloat16 [cols / 32, rows, 2] */
    int64_t rows, cols;
} Q4Weight;

typedef struct {
    const void *input_norm, *post_attention_norm; /* [hidden] */
    Q4Weight qkv, o, gate_up, down;
    void *key_cache, *value_cache; /* [num_slots, num_kv_heads, head_dim] */
    int64_t sliding_window, kv_group;
} DecodeLayer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size, num_slots, bf16,
        num_kv_groups;
    float eps, scale;
    const DecodeLayer *layers;
    const void *final_norm;
} DecodeModel;

/* residual += x (when given); normed = weight * residual / rms(residual), all rows. */
static void add_rms_norm(float *normed, float *residual, const float *x, const void *weight, int64_t rows,
                         int64_t hidden, float eps, int bf16)
{
    for (int64_t t = 0; t < rows; ++t) {
        float *r = residual + t * hidden;
        float squares = 0.0f;
        for (int64_t c = 0; c < hidden; ++c) {
            if (x)
                r[c] += x[t * hidden + c];
            squares += r[c] * r[c];
        }
        const float inverse = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (int64_t c = 0; c < hidden; ++c)
            normed[t * hidden + c] = load(weight, c, bf16) * (r[c] * inverse);
    }
}

/* y = x @ w.T, the weight's 64-row blocks shared among the threads of the enclosing
 * parallel region (the loop's end is a barrier). With `xb` (bfloat16 models on CPUs with
 * AVX512-BF16) x is first rounded to bfloat16 into xb and sums, the threads splitting its
 * groups, and the bfloat16 dot products run. */
static inline void q4_matmul(float *y, const float *x, int64_t rows, const Q4Weight *w, uint16_t *xb, float *sums)
{
#if Q4_HAS_BF16_DOT
    if (xb) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * w->cols / Q4_GROUP; ++i)
            q4_round_group(xb, sums, x, i);
    }
#endif
#pragma omp for schedule(static)
    for (int64_t block = 0; block < w->rows / Q4_BLOCK; ++block)
        q4_matmul_block(y, x, xb, sums, rows, w->packed, w->scales_and_zeros, w->rows, w->cols, block);
}

/* RoPE ("rotate half") in place on `heads` heads of one token, float32. */
static inline void rotate(float *x, int64_t heads, int64_t head_dim, const void *cos, const void *sin, int64_t row,
                          int bf16)
{
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float *x1 = x + h * head_dim, *x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
            const float c = load(cos, row * half + i, bf16), s = load(sin, row * half + i, bf16);
            const float a = x1[i], b = x2[i];
            x1[i] = a * c - b * s;
            x2[i] = b * c + a * s;
        }
    }
}

static inline __attribute__((always_inline)) int fused_decode(
    const DecodeModel *m, int64_t rows, const void *embedded, const void *cos, const void *sin,
    const int64_t *slot_mapping, const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    void *out, int bf16)
{
    for (int64_t t = 0; t < m->num_kv_groups * rows; ++t)
        if (slot_mapping[t] >= m->num_slots)
            return 1;
    const int64_t hidden = m->hidden, head_dim = m->head_dim, group = m->num_heads / m->num_kv_heads;
    const int64_t q_size = m->num_heads * head_dim, kv_size = m->num_kv_heads * head_dim;
    const int64_t qkv_size = q_size + 2 * kv_size, inter = m->intermediate;
    const int64_t widest = q_size > inter ? (q_size > hidden ? q_size : hidden) : (inter > hidden ? inter : hidden);
    const size_t floats = (size_t)rows * (size_t)(3 * hidden + qkv_size + q_size + 3 * inter + widest / Q4_GROUP);
    float *residual = malloc(sizeof(float) * floats);
    /* bfloat16 models where the CPU has AVX512-BF16: matmul inputs rounded to bfloat16 (as
     * the torch path rounds them) for the dot products that do two columns at once. */
    uint16_t *xb = bf16 && Q4_HAS_BF16_DOT ? malloc(sizeof(uint16_t) * (size_t)(rows * widest)) : NULL;
    if (residual == NULL || (bf16 && Q4_HAS_BF16_DOT && xb == NULL)) {
        free(residual), free(xb);
        return 2;
    }
    float *normed = residual + rows * hidden;   /* a norm's output: the next matmul's input */
    float *sublayer = normed + rows * hidden;   /* o_proj's or down_proj's output */
    float *qkv = sublayer + rows * hidden;
    float *attention = qkv + rows * qkv_size;
    float *gate_up = attention + rows * q_size;
    float *act = gate_up + rows * 2 * inter;
    float *sums = act + rows * inter; /* per 32 of a bfloat16-rounded matmul input */
    for (int64_t i = 0; i < rows * hidden; ++i)
        residual[i] = load(embedded, i, bf16);
    int failed = 0;

#pragma omp parallel
    {
        float *workspace = malloc(sizeof(float) * attend_workspace_floats(group, head_dim, m->block_size, bf16));
        if (workspace == NULL) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp barrier
        for (int64_t l = 0; l < m->num_layers && !failed; ++l) {
            const DecodeLayer *layer = m->layers + l;
            const int64_t *slots = slot_mapping + layer->kv_group * rows;
            const int32_t *tables = block_tables + layer->kv_group * rows * block_table_stride;
#pragma omp single
            add_rms_norm(normed, residual, l ? sublayer : NULL, layer->input_norm, rows, hidden, m->eps, bf16);
            q4_matmul(qkv, normed, rows, &layer->qkv, xb, sums);
#pragma omp single
            for (int64_t t = 0; t < rows; ++t) {
                float *token = qkv + t * qkv_size;
                rotate(token, m->num_heads + m->num_kv_heads, head_dim, cos, sin, t, bf16);
                const int64_t slot = slots[t];
                if (slot < 0)
                    continue;
                for (int64_t i = 0; i < kv_size; ++i) {
                    store(layer->key_cache, slot * kv_size + i, token[q_size + i], bf16);
                    store(layer->value_cache, slot * kv_size + i, token[q_size + kv_size + i], bf16);
                }
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t work = 0; work < rows * m->num_kv_heads; ++work) {
                const int64_t t = work / m->num_kv_heads, kv_head = work % m->num_kv_heads;
                const int64_t offset = kv_head * group * head_dim;
                attend_kv_head(attention + t * q_size + offset, qkv + t * qkv_size + offset, layer->key_cache,
                               layer->value_cache, tables + t * block_table_stride, seq_lens[t], layer->sliding_window,
                               kv_head, group, m->num_kv_heads, head_dim, m->block_size, m->scale, bf16, workspace);
            }
            q4_matmul(sublayer, attention, rows, &layer->o, xb, sums);
#pragma omp single
            add_rms_norm(normed, residual, sublayer, layer->post_attention_norm, rows, hidden, m->eps, bf16);
            q4_matmul(gate_up, normed, rows, &layer->gate_up, xb, sums);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * inter; ++i) {
                const int64_t t = i / inter, c = i % inter;
                const float g = gate_up[t * 2 * inter + c], u = gate_up[t * 2 * inter + inter + c];
                act[i] = g / (1.0f + expf(-g)) * u;
            }
            q4_matmul(sublayer, act, rows, &layer->down, xb, sums);
        }
        free(workspace);
    }
    if (!failed) {
        add_rms_norm(normed, residual, sublayer, m->final_norm, rows, hidden, m->eps, bf16);
        for (int64_t i = 0; i < rows * hidden; ++i)
            store(out, i, normed[i], bf16);
    }
    free(residual);
    free(xb);
    return failed;
}

int pagedserve_fused_decode_f32(
    const DecodeModel *model, int64_t rows, const float *embedded, const float *cos, const float *sin,
    const int64_t *slot_mapping, const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    float *out)
{
    return fused_decode(model, rows, embedded, cos, sin, slot_mapping, block_tables, block_table_stride, seq_lens,
                        out, 0);
}

/* The same with bfloat16 tensors (passed as their raw 16-bit patterns). */
int pagedserve_fused_decode_bf16(
    const DecodeModel *model, int64_t rows, const uint16_t *embedded, const uint16_t *cos, const uint16_t *sin,
    const int64_t *slot_mapping, const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
    uint16_t *out)
{
    return fused_decode(model, rows, embedded, cos, sin, slot_mapping, block_tables, block_table_stride, seq_lens,
                        out, 1);
}

/* y[num_rows, rows] = x[num_rows, cols] @ w.T alone (tests, benchmarks): float32
 * activations, or (bf16_activations, where the CPU has AVX512-BF16) x rounded to bfloat16.
 * Returns 1 where bfloat16 activations were asked for and the CPU lacks the instructions. */
int pagedserve_q4_matmul(
    float *y, const float *x, int64_t num_rows, const uint8_t *packed, const uint16_t *scales_and_zeros,
    int64_t rows, int64_t cols, int bf16_activations)
{
    if (bf16_activations && !Q4_HAS_BF16_DOT)
        return 1;
    uint16_t *xb = NULL;
    float *sums = NULL;
    if (bf16_activations) {
        xb = malloc(sizeof(uint16_t) * (size_t)(num_rows * cols));
        sums = malloc(sizeof(float) * (size_t)(num_rows * cols / Q4_GROUP));
        if (xb == NULL || sums == NULL) {
            free(xb), free(sums);
            return 2;
        }
    }
    const Q4Weight w = {packed, scales_and_zeros, rows, cols};
#pragma omp parallel
    q4_matmul(y, x, num_rows, &w, xb, sums);
    free(xb), free(sums);
    return 0;
}

/* 1 where bfloat16 models round matmul inputs for AVX512-BF16 dot products (this build). */
int pagedserve_q4_bf16_dot(void)
{
    return Q4_HAS_BF16_DOT;
}
