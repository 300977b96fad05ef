/* bf16 <-> fp32 for the CPU kernels: bf16 is the top half of an fp32, so widening is a
 * shift; narrowing rounds to nearest, ties to even, as torch does, keeping NaNs NaN. */
#ifndef PAGEDSERVE_BF16_H
#define PAGEDSERVE_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t bits)
{
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline uint16_t f32_to_bf16(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

/* Element i of a float32 (bf16 = 0) or bfloat16 array, as float32 (exact). */
static inline float load(const void *base, int64_t i, int bf16)
{
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* Element i of a float32 or bfloat16 array set to `value` (rounded to nearest even for bf16). */
static inline void store(void *base, int64_t i, float value, int bf16)
{
    if (bf16)
        ((uint16_t *)base)[i] = f32_to_bf16(value);
    else
        ((float *)base)[i] = value;
}

#endif
