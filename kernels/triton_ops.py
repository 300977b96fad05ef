"""Triton kernels for the paged KV cache: the CUDA path behind `kernels.kernel_module`.

Same signatures, shapes and semantics as `kernels/torch_ops.py` (read its docstring for
the tensor layouts); the tests run these in the Triton interpreter against that module.

Design choices that hold across the kernels:
- GQA: one program owns one KV head and computes its whole query group at once, so every
  K/V element is loaded once per program instead of once per query head. The group is
  padded to a power of two (and to 16 rows for `tl.dot`) and the padding rows masked.
- Softmax state (running max, running sum) and the output accumulator are float32. The
  `tl.dot` inputs stay in the cache dtype (fp16/bf16 use tensor cores and accumulate in
  fp32); the dots ask for `input_precision="ieee"`, which only changes fp32 inputs: they
  are not rounded to tf32. (bf16 under the interpreter is the one exception: see
  `_dot_dtype`.)
- Masked loads use `other=0` and masked scores are set to -inf *after* the dot, so
  whatever sits in unused slots (stale data, NaN) never reaches the output.
- No host syncs: grids come from `max_seq_len` / `max_query_len`, which the caller knows,
  and per-sequence lengths are read inside the kernels.
- float64 attention falls back to the torch implementation: the torch path accumulates
  float64 inputs in float64, which these fp32-accumulating kernels would not match, and
  float64 is a reference dtype, never a serving one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import torch_ops

# Tokens of context one decode program reduces before the second kernel combines the
# partial results (flash-decoding). Short contexts (<= one partition) skip the split.
# A power of two, a multiple of the block size and >= 16; tests lower it to exercise
# the split on small shapes.
PARTITION_SIZE = 512

# Context tokens one decode program loads per loop iteration (whole blocks: a block is
# never split across tiles): big enough to amortise the loop and feed `tl.dot`, small
# enough that a [tile, head_dim] K and V tile fit on chip.
_DECODE_TILE_TOKENS = 128

# Query rows (query tokens x padded query-group heads) one prefill program computes, and
# context tokens it loads per loop iteration (a whole block if blocks are larger).
_PREFILL_ROWS = 64
_PREFILL_TILE_TOKENS = 64

# Partial results the reduction kernel combines per loop iteration.
_REDUCE_PARTITIONS_PER_ITER = 64

# `tl.dot` needs every dimension >= 16.
_MIN_DOT_DIM = 16


# ----------------------------------------------------------------------------------------
# reshape_and_cache


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
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
    # One program per token: copies its [num_kv_heads, head_dim] K and V rows.
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


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots.

    Slots < 0 are skipped inside the kernel (no boolean indexing, so no host sync).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _check_cache_pair(key_cache, value_cache)
    block_size = key_cache.shape[1]
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        *key_cache.stride(),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
    )


# ----------------------------------------------------------------------------------------
# paged decode attention (flash-decoding)


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim], written when not SPLIT
    partial_out_ptr,  # fp32 [num_seqs, num_heads, max_partitions, head_dim] (SPLIT)
    partial_max_ptr,  # fp32 [num_seqs, num_heads, max_partitions] (SPLIT)
    partial_sum_ptr,  # fp32 [num_seqs, num_heads, max_partitions] (SPLIT)
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    scale,
    max_seq_len,
    stride_query_seq,
    stride_query_head,
    stride_query_dim,
    stride_out_seq,
    stride_out_head,
    stride_out_dim,
    stride_partial_seq,
    stride_partial_head,
    stride_partial_part,
    stride_stat_seq,
    stride_stat_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    stride_table_seq,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    # Grid: (num_seqs, num_kv_heads, num_partitions). One program reduces one partition of
    # one sequence's context for the GROUP query heads sharing one KV head.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    # Clamped like the torch path, which never looks past max_seq_len; this also keeps a
    # wrong max_seq_len from sending the reduction past the partial buffers.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_seq_len)
    if SPLIT:
        context_start = partition * PARTITION_SIZE
        if context_start >= seq_len:  # a shorter sequence in a batch with a long one
            return
        context_end = tl.minimum(seq_len, context_start + PARTITION_SIZE)
    else:
        context_start = 0
        context_end = seq_len

    group_rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + group_rows
    row_mask = group_rows < GROUP
    dim_mask = dims < HEAD_DIM
    query = tl.load(
        query_ptr
        + seq * stride_query_seq
        + heads[:, None] * stride_query_head
        + dims[None, :] * stride_query_dim,
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    # Every tile below holds at least one valid token, so the running max is finite after
    # the first tile and exp(max_old - max_new) never sees -inf - -inf.
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    kv_head_offset = kv_head * stride_cache_head + dims * stride_cache_dim  # [HEAD_DIM_PAD]
    for tile_start in range(context_start, context_end, TILE_TOKENS):
        tokens = tile_start + tl.arange(0, TILE_TOKENS)
        token_mask = tokens < context_end
        block_ids = tl.load(table_row + tokens // BLOCK_SIZE, mask=token_mask, other=0)
        token_offsets = (
            block_ids.to(tl.int64) * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_slot
        )
        kv_offsets = token_offsets[:, None] + kv_head_offset[None, :]  # [TILE, HEAD_DIM_PAD]
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        key = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        scores = tl.dot(query, tl.trans(key), input_precision="ieee") * scale
        scores = tl.where(token_mask[None, :], scores, float("-inf"))  # [GROUP_PAD, TILE]

        new_max = tl.maximum(running_max, tl.max(scores, 1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        value = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * rescale[:, None] + tl.dot(probs.to(DOT_DTYPE), value, input_precision="ieee")
        running_max = new_max

    # running_sum is 0 only for an empty context (seq_len 0, e.g. a padded batch slot):
    # write zeros there rather than 0/0.
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if SPLIT:
        stat_offsets = seq * stride_stat_seq + heads * stride_stat_head + partition
        tl.store(partial_max_ptr + stat_offsets, running_max, mask=row_mask)
        tl.store(partial_sum_ptr + stat_offsets, running_sum, mask=row_mask)
        tl.store(
            partial_out_ptr
            + seq * stride_partial_seq
            + heads[:, None] * stride_partial_head
            + partition * stride_partial_part
            + dims[None, :],
            out,
            mask=out_mask,
        )
    else:
        tl.store(
            out_ptr
            + seq * stride_out_seq
            + heads[:, None] * stride_out_head
            + dims[None, :] * stride_out_dim,
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )


@triton.jit
def _reduce_partitions_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    partial_out_ptr,  # fp32 [num_seqs, num_heads, max_partitions, head_dim], normalised
    partial_max_ptr,  # fp32 [num_seqs, num_heads, max_partitions]
    partial_sum_ptr,  # fp32 [num_seqs, num_heads, max_partitions]
    seq_lens_ptr,
    max_seq_len,
    stride_out_seq,
    stride_out_head,
    stride_out_dim,
    stride_partial_seq,
    stride_partial_head,
    stride_partial_part,
    stride_stat_seq,
    stride_stat_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    PARTS_PER_ITER: tl.constexpr,
):
    # Grid: (num_seqs, num_heads). Log-sum-exp combination of a sequence's partitions p,
    # each holding its normalised output out_p, softmax max m_p and sum s_p:
    #   w_p = s_p * exp(m_p - max_q m_q);  out = sum_p w_p * out_p / sum_p w_p.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), max_seq_len)  # as in the decode kernel
    num_partitions = tl.cdiv(seq_len, PARTITION_SIZE)  # partitions past it were never written
    stat_row = seq * stride_stat_seq + head * stride_stat_head
    partial_row = partial_out_ptr + seq * stride_partial_seq + head * stride_partial_head
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM

    max_seen = tl.full([PARTS_PER_ITER], float("-inf"), tl.float32)
    for first in range(0, num_partitions, PARTS_PER_ITER):
        parts = first + tl.arange(0, PARTS_PER_ITER)
        part_max = tl.load(
            partial_max_ptr + stat_row + parts, mask=parts < num_partitions, other=float("-inf")
        )
        max_seen = tl.maximum(max_seen, part_max)
    global_max = tl.max(max_seen, 0)

    weight_total = tl.zeros([PARTS_PER_ITER], tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD], tl.float32)
    for first in range(0, num_partitions, PARTS_PER_ITER):
        parts = first + tl.arange(0, PARTS_PER_ITER)
        part_mask = parts < num_partitions
        part_max = tl.load(partial_max_ptr + stat_row + parts, mask=part_mask, other=0.0)
        part_sum = tl.load(partial_sum_ptr + stat_row + parts, mask=part_mask, other=0.0)
        weights = tl.where(part_mask, part_sum * tl.exp(part_max - global_max), 0.0)
        part_out = tl.load(
            partial_row + parts[:, None] * stride_partial_part + dims[None, :],
            mask=part_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(weights[:, None] * part_out, 0)
        weight_total += weights
    total = tl.sum(weight_total, 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + dims * stride_out_dim,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_mask,
    )


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """One query token per sequence: query [num_seqs, num_heads, head_dim] -> same shape.

    Contexts longer than `PARTITION_SIZE` are split into partitions reduced by parallel
    programs (so a batch of one long sequence still fills the device), then combined.
    """
    if query.dtype == torch.float64:
        return torch_ops.paged_decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len
        )
    _check_attention_inputs(query, key_cache, value_cache)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    partition_size = PARTITION_SIZE
    _check_partition_size(partition_size, block_size)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0 or max_seq_len <= 0:
        return out.zero_()

    num_partitions = triton.cdiv(max_seq_len, partition_size)
    split = num_partitions > 1
    if split:
        partial_out = torch.empty(
            (num_seqs, num_heads, num_partitions, head_dim), dtype=torch.float32, device=query.device
        )
        partial_max = torch.empty(
            (num_seqs, num_heads, num_partitions), dtype=torch.float32, device=query.device
        )
        partial_sum = torch.empty_like(partial_max)
    else:
        # Unused by the kernel (SPLIT is a constexpr), but it needs pointers and strides.
        partial_out = partial_max = partial_sum = out
    head_dim_pad = triton.next_power_of_2(max(head_dim, _MIN_DOT_DIM))
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out,
        partial_out,
        partial_max,
        partial_sum,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        scale,
        max_seq_len,
        *query.stride(),
        *out.stride(),
        *partial_out.stride()[:3],
        *partial_max.stride()[:2],
        *key_cache.stride(),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(max(group, _MIN_DOT_DIM)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        TILE_TOKENS=min(max(_DECODE_TILE_TOKENS, block_size), partition_size),
        PARTITION_SIZE=partition_size,
        SPLIT=split,
        DOT_DTYPE=_dot_dtype(key_cache.dtype),
        num_warps=4,
    )
    if split:
        _reduce_partitions_kernel[(num_seqs, num_heads)](
            out,
            partial_out,
            partial_max,
            partial_sum,
            seq_lens,
            max_seq_len,
            *out.stride(),
            *partial_out.stride()[:3],
            *partial_max.stride()[:2],
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            PARTITION_SIZE=partition_size,
            PARTS_PER_ITER=min(triton.next_power_of_2(num_partitions), _REDUCE_PARTITIONS_PER_ITER),
            num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------
# paged prefill / extend attention


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale,
    stride_query_token,
    stride_query_head,
    stride_query_dim,
    stride_out_token,
    stride_out_head,
    stride_out_dim,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_dim,
    stride_table_seq,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    QUERIES_PER_PROGRAM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    # Grid: (cdiv(max_query_len, QUERIES_PER_PROGRAM), num_seqs, num_kv_heads). A program's
    # rows are QUERIES_PER_PROGRAM query tokens x GROUP_PAD heads of one KV head's group
    # (row = token * GROUP_PAD + head-in-group), so each K/V tile serves the whole group.
    query_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    first_query = query_block * QUERIES_PER_PROGRAM
    if first_query >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - query_len  # tokens already cached before this step's

    rows = tl.arange(0, QUERIES_PER_PROGRAM * GROUP_PAD)
    query_index = first_query + rows // GROUP_PAD  # within this sequence's new tokens
    group_row = rows % GROUP_PAD
    heads = kv_head * GROUP + group_row
    row_mask = (query_index < query_len) & (group_row < GROUP)
    query_position = prefix_len + query_index  # position in the sequence, for causality
    query_token = (query_start + query_index).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    query = tl.load(
        query_ptr
        + query_token[:, None] * stride_query_token
        + heads[:, None] * stride_query_head
        + dims[None, :] * stride_query_dim,
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    # The loop starts at position 0, which every row may see, so the running max is finite
    # after the first tile even for rows whose later tiles are fully causally masked.
    running_max = tl.full([QUERIES_PER_PROGRAM * GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([QUERIES_PER_PROGRAM * GROUP_PAD], tl.float32)
    acc = tl.zeros([QUERIES_PER_PROGRAM * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    kv_head_offset = kv_head * stride_cache_head + dims * stride_cache_dim
    # Last position the program's last query token sees, plus one.
    context_end = prefix_len + tl.minimum(query_len, first_query + QUERIES_PER_PROGRAM)
    for tile_start in range(0, context_end, TILE_TOKENS):
        tokens = tile_start + tl.arange(0, TILE_TOKENS)
        token_mask = tokens < context_end
        block_ids = tl.load(table_row + tokens // BLOCK_SIZE, mask=token_mask, other=0)
        token_offsets = (
            block_ids.to(tl.int64) * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_slot
        )
        kv_offsets = token_offsets[:, None] + kv_head_offset[None, :]
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        key = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        scores = tl.dot(query, tl.trans(key), input_precision="ieee") * scale
        visible = token_mask[None, :] & (tokens[None, :] <= query_position[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, 1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        value = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * rescale[:, None] + tl.dot(probs.to(DOT_DTYPE), value, input_precision="ieee")
        running_max = new_max

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(
        out_ptr
        + query_token[:, None] * stride_out_token
        + heads[:, None] * stride_out_head
        + dims[None, :] * stride_out_dim,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:
    """Varlen causal attention of each sequence's new tokens over its whole cached context.

    query [num_tokens, num_heads, head_dim]: the last `q_len` tokens of sequence i sit at
    positions seq_len - q_len .. seq_len - 1 and see every cached position up to their own
    (the cached prefix and this step's tokens, which `reshape_and_cache` wrote first).
    `max_query_len` sizes the grid, so it must be at least every sequence's q_len.
    """
    if query.dtype == torch.float64:
        return torch_ops.paged_prefill_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            scale,
            max_query_len,
            max_seq_len,
        )
    del max_seq_len  # each program bounds its own loop by its sequence's length
    _check_attention_inputs(query, key_cache, value_cache)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    _check_block_size(block_size)
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    # At least _PREFILL_ROWS rows (and >= 16 for tl.dot) however large the group.
    queries_per_program = max(1, _PREFILL_ROWS // group_pad)
    grid = (triton.cdiv(max_query_len, queries_per_program), num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        *query.stride(),
        *out.stride(),
        *key_cache.stride(),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        QUERIES_PER_PROGRAM=queries_per_program,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(max(head_dim, _MIN_DOT_DIM)),
        BLOCK_SIZE=block_size,
        TILE_TOKENS=max(_PREFILL_TILE_TOKENS, block_size),
        DOT_DTYPE=_dot_dtype(key_cache.dtype),
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------
# host-side helpers (metadata only, no device work)


_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_dtype(cache_dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of the attention `tl.dot`s: the cache dtype, except bf16 under the
    interpreter, which multiplies bf16's raw uint16 storage instead of its values
    (triton-lang/triton#11584, "not supported yet"), so the interpreter gets fp32 operands.
    On a GPU bf16 stays bf16 and runs on tensor cores."""
    if cache_dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        return tl.float32
    return _TRITON_DTYPES[cache_dtype]



def _check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError(
            f"key and value caches must share shape and strides: key {tuple(key_cache.shape)} "
            f"strides {key_cache.stride()}, value {tuple(value_cache.shape)} "
            f"strides {value_cache.stride()}"
        )


def _check_attention_inputs(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> None:
    _check_cache_pair(key_cache, value_cache)
    if query.dtype != key_cache.dtype:
        raise ValueError(
            f"the Triton attention kernels need query and cache of one dtype: query is "
            f"{query.dtype}, cache is {key_cache.dtype}"
        )
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"{num_heads} query heads cannot be grouped over {num_kv_heads} KV heads"
        )


def _check_block_size(block_size: int) -> None:
    """Tiles are `tl.arange` ranges made of whole blocks, so sizes must be powers of two."""
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two block size, not {block_size}")


def _check_partition_size(partition_size: int, block_size: int) -> None:
    _check_block_size(block_size)
    if partition_size & (partition_size - 1):
        raise ValueError(f"partition size {partition_size} must be a power of two")
    if partition_size < max(block_size, _MIN_DOT_DIM):
        raise ValueError(
            f"partition size {partition_size} must be >= the block size {block_size} and >= "
            f"{_MIN_DOT_DIM}"
        )
