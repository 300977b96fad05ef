"""The Triton kernel of paged prefill/extend attention: each sequence's new tokens attend
causally over its cached prefix and themselves, read through the block table."""

from __future__ import annotations

import triton
import triton.language as tl

from pagedserve.kernels.triton_kernels.online_softmax import online_softmax_output, online_softmax_step


@triton.jit
def paged_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim], any strides
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # same shape and strides as key_cache
    block_tables_ptr,  # int32 [num_seqs, max_blocks_per_seq]
    query_start_loc_ptr,  # int32 [num_seqs + 1]
    seq_lens_ptr,  # int32 [num_seqs]
    scale,
    sliding_window,  # read where HAS_WINDOW: a query at p sees keys at p - sliding_window < k <= p
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
    HAS_WINDOW: tl.constexpr,
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

    # The loop starts at position 0, or with a window at the program's first query's window
    # start: blocks before it (maybe freed) are never read. Rows that see nothing of a
    # tile keep a zero state (`online_softmax_step`).
    running_max = tl.full([QUERIES_PER_PROGRAM * GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([QUERIES_PER_PROGRAM * GROUP_PAD], tl.float32)
    acc = tl.zeros([QUERIES_PER_PROGRAM * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    kv_head_offset = kv_head * stride_cache_head + dims * stride_cache_dim
    # Last position the program's last query token sees, plus one.
    context_end = prefix_len + tl.minimum(query_len, first_query + QUERIES_PER_PROGRAM)
    context_start = 0
    if HAS_WINDOW:
        context_start = tl.maximum(prefix_len + first_query - sliding_window + 1, 0)
    for tile_start in range(context_start, context_end, TILE_TOKENS):
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
        if HAS_WINDOW:
            visible = visible & (tokens[None, :] > query_position[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
        value = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        running_max, running_sum, acc = online_softmax_step(
            scores, value, running_max, running_sum, acc, DOT_DTYPE
        )

    out = online_softmax_output(acc, running_sum)
    tl.store(
        out_ptr
        + query_token[:, None] * stride_out_token
        + heads[:, None] * stride_out_head
        + dims[None, :] * stride_out_dim,
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )
