"""The Triton kernels of paged decode attention, flash-decoding style: one kernel reduces
each partition of a sequence's context (or the whole context when it fits one partition),
a second combines the partitions' partial results."""

from __future__ import annotations

import triton
import triton.language as tl

from pagedserve.kernels.triton_kernels.online_softmax import online_softmax_output, online_softmax_step


@triton.jit
def paged_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim], written when not SPLIT
    partial_out_ptr,  # fp32 [num_seqs, num_heads, max_partitions, head_dim] (SPLIT)
    partial_max_ptr,  # fp32 [num_seqs, num_heads, max_partitions] (SPLIT)
    partial_sum_ptr,  # fp32 [num_seqs, num_heads, max_partitions] (SPLIT)
    query_ptr,  # [num_seqs, num_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # same shape and strides as key_cache
    block_tables_ptr,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # int32 [num_seqs]
    scale,
    max_seq_len,
    sliding_window,  # > 0: each query sees the last sliding_window tokens; 0: all
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
    # Partitions tile the window (the whole context without one) from its first token, so
    # blocks before it, which the scheduler may have freed, are never read.
    window_start = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
    if SPLIT:
        context_start = window_start + partition * PARTITION_SIZE
        if context_start >= seq_len:  # a shorter sequence in a batch with a long one
            return
        context_end = tl.minimum(seq_len, context_start + PARTITION_SIZE)
    else:
        context_start = window_start
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
    # the first tile (what `online_softmax_step` needs).
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
        value = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        running_max, running_sum, acc = online_softmax_step(
            scores, value, running_max, running_sum, acc, DOT_DTYPE
        )

    out = online_softmax_output(acc, running_sum)
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
def reduce_partitions_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    partial_out_ptr,  # fp32 [num_seqs, num_heads, max_partitions, head_dim], normalised
    partial_max_ptr,  # fp32 [num_seqs, num_heads, max_partitions]
    partial_sum_ptr,  # fp32 [num_seqs, num_heads, max_partitions]
    seq_lens_ptr,  # int32 [num_seqs]
    max_seq_len,
    sliding_window,  # as in the decode kernel
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
    window_start = tl.where(sliding_window > 0, tl.maximum(seq_len - sliding_window, 0), 0)
    # Partitions past these were never written.
    num_partitions = tl.cdiv(seq_len - window_start, PARTITION_SIZE)
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
