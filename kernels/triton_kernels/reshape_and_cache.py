"""The Triton kernel writing one step's new K/V rows into their paged-cache slots."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], any strides
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], any strides
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # same shape and strides as key_cache
    slot_mapping_ptr,  # int64 [num_tokens]
    stride_key_token,
    stride_key_head,
    stride_key_dim,
    stride_value_token,
    stride_value_head,
    stride_value_dim,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # Grid: (num_tokens,). One program per token copies its [num_kv_heads, head_dim] K and
    # V rows; slots < 0 are skipped here, so the host never filters them (no sync).
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: the caller asked us to leave the cache alone
        return
    block = slot // BLOCK_SIZE
    offset_in_block = slot % BLOCK_SIZE
    heads = tl.arange(0, KV_HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    key = tl.load(
        key_ptr
        + token * stride_key_token
        + heads[:, None] * stride_key_head
        + dims[None, :] * stride_key_dim,
        mask=mask,
    )
    value = tl.load(
        value_ptr
        + token * stride_value_token
        + heads[:, None] * stride_value_head
        + dims[None, :] * stride_value_dim,
        mask=mask,
    )
    cache_offsets = (
        block * stride_cache_block
        + offset_in_block * stride_cache_slot
        + heads[:, None] * stride_cache_head
        + dims[None, :] * stride_cache_dim
    )
    tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(
        value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask
    )
