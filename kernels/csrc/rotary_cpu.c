/*
 * Rotary position embedding (RoPE, HF's "rotate half" layout) for CPUs, float32 or bfloat16:
 * per head, with the halves x1 = x[:d/2], x2 = x[d/2:] and the position's cos/sin rows,
 *
 *   out[:d/2] = x1 * cos - x2 * sin,   out[d/2:] = x2 * cos + x1 * sin
 *
 * with the rounding of torch's own ops step by step (each product rounded to the dtype, then
 * the sum), so the result is the same bits as `kernels/rotary.py`'s torch path. Hence no
 * fused multiply-add here (it would round once where torch rounds twice), whatever -ffast-math.
 *
 * Why: in torch it is seven small ops per layer (an output, four products, a subtract, an
 * add), dispatch-bound at decode where a layer rotates a few hundred numbers.
 *
 * Shapes: x: [num_tokens, num_heads, head_dim], token t at x + t * x_token_stride elements,
 * heads dense within a token (a view into the fused qkv projection's rows is fine); out:
 * [num_tokens, num_heads, head_dim] contiguous; cos, sin: [num_tokens, head_dim / 2]
 * contiguous (each token's position already looked up).
 */

#pragma GCC optimize("fp-contract=off")

#include <stdint.h>

#include "bf16.h"

/* A product or sum computed in float32, rounded to the element type as torch's op rounds
 * it, and widened back (exact). */
static inline float round_to(float value, int bf16)
{
    return bf16 ? bf16_to_f32(f32_to_bf16(value)) : value;
}

/* `bf16` is a constant in each exported wrapper, so the compiler emits two specialised
 * copies. bf16 * bf16 is exact in float32, so rounding it once is torch's bf16 product. */
static inline __attribute__((always_inline)) void rotary(
    void *out, const void *x, int64_t x_token_stride, const void *cos, const void *sin, int64_t num_tokens,
    int64_t num_heads, int64_t head_dim, int bf16)
{
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < num_tokens; ++t) {
        for (int64_t h = 0; h < num_heads; ++h) {
            const int64_t in = t * x_token_stride + h * head_dim, o = (t * num_heads + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = load(x, in + i, bf16), x2 = load(x, in + half + i, bf16);
                const float c = load(cos, t * half + i, bf16), s = load(sin, t * half + i, bf16);
                store(out, o + i, round_to(x1 * c, bf16) - round_to(x2 * s, bf16), bf16);
                store(out, o + half + i, round_to(x2 * c, bf16) + round_to(x1 * s, bf16), bf16);
            }
        }
    }
}

void pagedserve_rotary_f32(
    float *out, const float *x, int64_t x_token_stride, const float *cos, const float *sin, int64_t num_tokens,
    int64_t num_heads, int64_t head_dim)
{
    rotary(out, x, x_token_stride, cos, sin, num_tokens, num_heads, head_dim, 0);
}

void pagedserve_rotary_bf16(
    uint16_t *out, const uint16_t *x, int64_t x_token_stride, const uint16_t *cos, const uint16_t *sin,
    int64_t num_tokens, int64_t num_heads, int64_t head_dim)
{
    rotary(out, x, x_token_stride, cos, sin, num_tokens, num_heads, head_dim, 1);
}
