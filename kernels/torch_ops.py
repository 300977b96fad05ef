"""Torch implementations of the paged-KV ops (`kernels.paged_attention_ops.PagedAttentionOps`,
whose docstring holds the tensor shapes): the reference the C and Triton kernels are tested
against, and the fallback wherever neither runs.

Softmax runs in float32 at least, whatever the cache dtype (float64 inputs in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots."""
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    flat_k = key_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = value_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_k.index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def _gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """[..., num_blocks_used] block ids -> [..., length, num_kv_heads, head_dim]."""
    # index_select on the flattened ids is several times faster on CPU than advanced
    # indexing with a multi-dimensional index tensor.
    flat_ids = block_ids.reshape(-1).long()
    gathered = cache.index_select(0, flat_ids).view(*block_ids.shape, *cache.shape[1:])
    shape = gathered.shape
    flat = gathered.reshape(*shape[:-4], shape[-4] * shape[-3], shape[-2], shape[-1])
    return flat[..., :length, :, :]


def length_buckets(seq_lens: list[int], block_size: int, max_padding: float = 0.3) -> list[list[int]]:
    """Rows of a decode batch grouped by context length, longest first.

    Each group is gathered padded to its longest member, so one group for a batch of
    mixed lengths copies mostly padding; one group per row pays per-call overhead on
    every layer. A row joins the current group while padding it to the group's length
    wastes at most `max_padding` of that length.
    """
    order = sorted(range(len(seq_lens)), key=lambda row: -seq_lens[row])
    groups: list[list[int]] = []
    group_blocks = 0
    for row in order:
        blocks = -(-seq_lens[row] // block_size)
        if not groups or blocks < (1 - max_padding) * group_blocks:
            groups.append([])
            group_blocks = blocks
        groups[-1].append(row)
    return groups


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"a sliding window holds at least 1 token, not {sliding_window}")


def first_visible_position(seq_len: int, sliding_window: int | None) -> int:
    """The first position a query at position seq_len - 1 sees: 0, or the start of its
    window (Hugging Face's `kv_idx > q_idx - sliding_window`: the last `sliding_window`
    tokens, the query's own included)."""
    return 0 if sliding_window is None else max(0, seq_len - sliding_window)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: query [num_seqs, num_heads, head_dim] -> same shape.

    Sequences of similar length are gathered together (see `length_buckets`); the query
    heads sharing a KV head ride as SDPA's query length ([seqs, kv_heads, group, head_dim]),
    so GQA never repeats K/V and the gathered blocks are read in place, without a
    transposing copy. With a sliding window only the blocks from each row's window start
    on are gathered (the ones before may have been freed), and the length bucketed is the
    window's span, not the whole context.
    """
    del max_seq_len  # only the Triton grid needs it
    _check_window(sliding_window)
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    acc = _accumulation_dtype(query.dtype)
    lens = seq_lens.tolist()
    out = torch.empty(num_seqs, num_kv_heads, group, head_dim, dtype=query.dtype, device=query.device)
    grouped_query = query.view(num_seqs, num_kv_heads, group, head_dim)
    if sliding_window is None:
        first_blocks = [0] * num_seqs
        spans = lens
    else:
        first_blocks = [first_visible_position(n, sliding_window) // block_size for n in lens]
        spans = [n - first * block_size for n, first in zip(lens, first_blocks)]
    for rows in length_buckets(spans, block_size):
        num_used_blocks = -(-spans[rows[0]] // block_size)
        length = num_used_blocks * block_size
        index = None if len(rows) == num_seqs else torch.tensor(rows, device=query.device)
        row_tables = block_tables if index is None else block_tables.index_select(0, index)
        row_lens = (seq_lens if index is None else seq_lens.index_select(0, index)).to(torch.int64)
        offsets = torch.arange(length, device=query.device)
        if sliding_window is None:
            tables = row_tables[:, :num_used_blocks]
            positions = offsets[None, :]
            visible = positions < row_lens[:, None]  # [n, T]
        else:
            # Columns from each row's first window block on; a row shorter than the bucket's
            # longest reads clamped (valid, masked) columns past its end.
            row_first = torch.tensor(
                first_blocks if index is None else [first_blocks[row] for row in rows], device=query.device
            )
            columns = (row_first[:, None] + torch.arange(num_used_blocks, device=query.device)[None, :]).clamp_(
                max=block_tables.shape[1] - 1
            )
            tables = row_tables.gather(1, columns)
            positions = row_first[:, None] * block_size + offsets[None, :]
            visible = (positions < row_lens[:, None]) & (positions >= row_lens[:, None] - sliding_window)
        k = _gather_context(key_cache, tables, length).to(acc).transpose(1, 2)  # [n, kvh, T, d]
        v = _gather_context(value_cache, tables, length).to(acc).transpose(1, 2)
        q = grouped_query if index is None else grouped_query.index_select(0, index)
        o = F.scaled_dot_product_attention(q.to(acc), k, v, attn_mask=visible[:, None, None, :], scale=scale)
        if index is None:
            out.copy_(o)
        else:
            out.index_copy_(0, index, o.to(query.dtype))
    return out.view(num_seqs, num_heads, head_dim)


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
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Varlen causal attention of each sequence's new tokens over its whole cached context.

    query [num_tokens, num_heads, head_dim]: the last `q_len` tokens of sequence i sit at
    positions seq_len - q_len .. seq_len - 1 and see every cached position up to their own,
    or (`sliding_window`) the last `sliding_window` of them; then only the blocks from the
    first query's window on are gathered.
    """
    del max_query_len, max_seq_len  # only the Triton grid needs them
    _check_window(sliding_window)
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    acc = _accumulation_dtype(query.dtype)
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_used_blocks = (seq_len + block_size - 1) // block_size
        # The first query's window start bounds what any query of this step reads.
        first_block = first_visible_position(seq_len - q_len + 1, sliding_window) // block_size
        context_start = first_block * block_size
        table = block_tables[i, first_block:num_used_blocks]
        k = _gather_context(key_cache, table, seq_len - context_start).to(acc)  # [T, kvh, d]
        v = _gather_context(value_cache, table, seq_len - context_start).to(acc)
        q = query[q_start:q_end].to(acc)
        if q_len == seq_len and (sliding_window is None or sliding_window >= seq_len):
            # No cached prefix and no window cut: plain causal attention, which SDPA's fused
            # kernel does without materialising a mask (several times faster on CPU).
            visible, causal = None, True
        else:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            k_pos = torch.arange(context_start, seq_len, device=query.device)
            visible, causal = k_pos[None, :] <= q_pos[:, None], False  # [q_len, T]
            if sliding_window is not None:
                visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=visible,
            is_causal=causal,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[q_start:q_end] = o[0].transpose(0, 1).to(query.dtype)
    return out
