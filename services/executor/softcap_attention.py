"""Attention with Gemma 2's logit soft-capping, over the paged KV cache, in torch.

Gemma 2 caps every attention logit as `cap * tanh(logits / cap)` before the softmax. No
paged-attention op in `kernels/` takes a cap (nor does SDPA: HF runs Gemma 2 in eager
attention for the same reason), so soft-capped layers attend here, one sequence at a
time, with the scores materialised: fine for the small Gemma 2 models this serves on CPU,
and the one place to replace by a kernel keyword when a fast path is needed.

Numerics follow HF's `eager_attention_forward`: scores = q k^T * scale in the model dtype,
then / cap, tanh, * cap, masked, softmax in float32 (float64 stays float64), cast back.
"""

from __future__ import annotations

import torch

from pagedserve.services.executor.attention_metadata import AttentionMetadata


def _attend(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, table: torch.Tensor,
    seq_len: int, scale: float, cap: float, window: int | None,
) -> torch.Tensor:
    """q [q_len, num_heads, head_dim] at positions seq_len - q_len .. seq_len - 1 over the
    sequence's first seq_len cached tokens -> [q_len, num_heads, head_dim]."""
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    ids = table[:num_blocks].long()
    k = key_cache.index_select(0, ids).reshape(-1, num_kv_heads, head_dim)[:seq_len]
    v = value_cache.index_select(0, ids).reshape(-1, num_kv_heads, head_dim)[:seq_len]
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [num_heads, seq_len, head_dim]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), k.transpose(1, 2).to(q.dtype)) * scale  # [heads, q_len, seq_len]
    scores = torch.tanh(scores / cap) * cap
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=accumulate).to(q.dtype)
    return torch.matmul(probs, v.to(q.dtype)).transpose(0, 1)


def softcapped_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    cap: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """query [num_tokens, num_heads, head_dim] (decodes first, then prefill chunks, as
    `AttentionMetadata` orders them) -> the same shape; K/V of this step already cached."""
    out = torch.empty_like(query)
    nd = meta.num_decode_tokens
    decode_lens = meta.decode_seq_lens.tolist()
    for row in range(nd):
        out[row : row + 1] = _attend(
            query[row : row + 1], key_cache, value_cache, meta.decode_block_tables[row], decode_lens[row],
            scale, cap, sliding_window,
        )
    starts = meta.prefill_query_start_loc.tolist()
    for i, seq_len in enumerate(meta.prefill_seq_lens.tolist()):
        start, end = nd + starts[i], nd + starts[i + 1]
        if end > start:
            out[start:end] = _attend(
                query[start:end], key_cache, value_cache, meta.prefill_block_tables[i], seq_len, scale, cap, sliding_window
            )
    return out
