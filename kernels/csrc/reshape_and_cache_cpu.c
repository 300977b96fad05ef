/*
 * Write a step's new K/V rows into their paged-cache slots, for CPUs: one pass, any element
 * type (the rows are copied as bytes; the caller checks that they already have the cache's
 * dtype).
 *
 * Why: torch does it in eight small ops per layer (a mask of valid slots, its all(), two
 * views, two index_copy_, two dtype casts), about 30 us of dispatch on a 2-core CPU for a
 * few hundred bytes of copying at decode; 30 layers make that a millisecond of every step.
 *
 * Semantics are those of torch_ops.reshape_and_cache:
 *   key, value:             [num_tokens] rows of `row_bytes` bytes (num_kv_heads * head_dim
 *                           elements), row t at key + t * key_stride bytes (a view into the
 *                           fused qkv projection is fine, its rows need only be dense)
 *   key_cache, value_cache: [num_slots] rows of `row_bytes`, slot = block * block_size + offset
 *   slot_mapping:           int64 [num_tokens]; a slot < 0 skips the token (batch padding)
 *
 * Returns 0, or 1 when a slot is past the cache (nothing is written then).
 */

#include <stdint.h>
#include <string.h>

int pagedserve_reshape_and_cache(
    const char *key, const char *value, int64_t key_stride, int64_t value_stride, char *key_cache,
    char *value_cache, const int64_t *slot_mapping, int64_t num_tokens, int64_t row_bytes, int64_t num_slots)
{
    for (int64_t t = 0; t < num_tokens; ++t)
        if (slot_mapping[t] >= num_slots)
            return 1;
    for (int64_t t = 0; t < num_tokens; ++t) {
        const int64_t slot = slot_mapping[t];
        if (slot < 0)
            continue;
        memcpy(key_cache + slot * row_bytes, key + t * key_stride, (size_t)row_bytes);
        memcpy(value_cache + slot * row_bytes, value + t * value_stride, (size_t)row_bytes);
    }
    return 0;
}
