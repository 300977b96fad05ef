/*
 * Fused residual add + RMSNorm for CPUs, float32 or bfloat16, in one pass over each row:
 *
 *   residual += x                                  (in the tensor dtype, as torch adds)
 *   out = weight * to_dtype(r * rsqrt(mean(r^2) + eps)),  r = float32(residual)
 *
 * which is HF's LlamaRMSNorm applied to `residual + x`, step for step (float32 statistics
 * whatever the dtype, the normalised row rounded to the dtype before the weight multiplies
 * it). Only the order of the float32 sum of squares differs from torch's.
 *
 * Why: per decoder layer the model adds a residual and normalises twice; in torch that is
 * seven small kernels each (add, to float32, pow, mean, rsqrt, mul, to dtype, mul), each a
 * pass over memory and a dispatch. Here it is one pass per row, rows spread over OpenMP
 * threads when there are enough of them to pay for waking the threads.
 *
 * Shapes: x, residual, out: [rows, cols] contiguous; weight: [cols]. `x` may be NULL (no
 * add: the first layer's input norm). out may alias x.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* Rows at which the threads are worth waking (measured on 2 cores: below this the fork and
 * join cost more than the row work). */
#define PARALLEL_ROWS 16

void pagedserve_add_rms_norm_f32(
    float *out, float *residual, const float *x, const float *weight, int64_t rows, int64_t cols, float eps)
{
#pragma omp parallel for if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        float *r = residual + row * cols;
        const float *in = x ? x + row * cols : NULL;
        float *o = out + row * cols;
        float squares = 0.0f;
        if (in) {
#pragma omp simd reduction(+ : squares)
            for (int64_t c = 0; c < cols; ++c) {
                r[c] += in[c];
                squares += r[c] * r[c];
            }
        } else {
#pragma omp simd reduction(+ : squares)
            for (int64_t c = 0; c < cols; ++c)
                squares += r[c] * r[c];
        }
        const float inverse = 1.0f / sqrtf(squares / (float)cols + eps);
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c)
            o[c] = weight[c] * (r[c] * inverse);
    }
}

void pagedserve_add_rms_norm_bf16(
    uint16_t *out, uint16_t *residual, const uint16_t *x, const uint16_t *weight, int64_t rows, int64_t cols,
    float eps)
{
#pragma omp parallel for if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        uint16_t *r = residual + row * cols;
        const uint16_t *in = x ? x + row * cols : NULL;
        uint16_t *o = out + row * cols;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t c = 0; c < cols; ++c) {
            float value = bf16_to_f32(r[c]);
            if (in) {
                value = bf16_to_f32(f32_to_bf16(value + bf16_to_f32(in[c]))); /* torch's bf16 add */
                r[c] = f32_to_bf16(value);
            }
            squares += value * value;
        }
        const float inverse = 1.0f / sqrtf(squares / (float)cols + eps);
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(r[c]) * inverse));
            o[c] = f32_to_bf16(bf16_to_f32(weight[c]) * normed);
        }
    }
}
