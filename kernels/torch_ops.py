"""Torch implementations of the paged-KV kernels: the CPU serving path and the reference
the Triton kernels are tested against.

Shapes at this boundary (shared with `kernels/triton_ops.py`):
  key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping:           int64 [num_tokens]; slot = block_id * block_size + offset, < 0 skips
  block_tables:           int32 [num_seqs, max_blocks_per_seq]; entries past a sequence's
                          last block are padding and must still be valid block ids (0)
  seq_lens:               int32 [num_seqs]; tokens in the cache *including* this step's
  query_start_loc:        int32 [num_seqs + 1]; cumulative query lengths (varlen batch)
Softmax runs in float32 at least, whatever the cache dtype.
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


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """One query token per sequence: query [num_seqs, num_heads, head_dim] -> same shape."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    acc = _accumulation_dtype(query.dtype)
    num_used_blocks = (max_seq_len + block_size - 1) // block_size
    tables = block_tables[:, :num_used_blocks]
    k = _gather_context(key_cache, tables, max_seq_len).to(acc)  # [B, T, kvh, d]
    v = _gather_context(value_cache, tables, max_seq_len).to(acc)
    q = query.to(acc).view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("bkgd,btkd->bkgt", q, k) * scale
    positions = torch.arange(max_seq_len, device=query.device)
    beyond = positions[None, :] >= seq_lens.to(positions.dtype)[:, None]  # [B, T]
    scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgt,btkd->bkgd", probs, v)
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


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
    positions seq_len - q_len .. seq_len - 1 and see every cached position up to their own.
    """
    del max_query_len, max_seq_len  # only the Triton grid needs them
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
        table = block_tables[i, :num_used_blocks]
        k = _gather_context(key_cache, table, seq_len).to(acc)  # [T, kvh, d]
        v = _gather_context(value_cache, table, seq_len).to(acc)
        q = query[q_start:q_end].to(acc)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        visible = k_pos[None, :] <= q_pos[:, None]  # [q_len, T]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=visible,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[q_start:q_end] = o[0].transpose(0, 1).to(query.dtype)
    return out
