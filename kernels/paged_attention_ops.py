"""The paged-attention ops every kernel implementation provides, and the tensor shapes at
that boundary, documented here once.

Three modules implement `PagedAttentionOps`: `kernels/torch_ops.py` (the reference),
`kernels/cpu_ops.py` (CPU serving path) and `kernels/triton_ops.py` (CUDA path).
`kernels.kernel_module` returns one of them, typed as this Protocol, so the executor codes
against these signatures rather than against whichever module it got. A module satisfies a
Protocol structurally (PEP 544): its functions stand for the methods below, without `self`.
An implementation may add keyword-only tuning parameters with defaults (the Triton decode
kernel's partition size); `tests/kernels/test_paged_attention_ops.py` checks the rest of
every signature against this one.

Shapes at this boundary:
  key, value:             [num_tokens, num_kv_heads, head_dim]; this step's new K/V
  key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]; one layer's cache
  slot_mapping:           int64 [num_tokens]; slot = block_id * block_size + offset, < 0 skips
  block_tables:           int32 [num_seqs, max_blocks_per_seq]; entries past a sequence's
                          last block are padding and must still be valid block ids (0)
  seq_lens:               int32 [num_seqs]; tokens in the cache *including* this step's
  query_start_loc:        int32 [num_seqs + 1]; cumulative query lengths (varlen batch)
  query (decode):         [num_seqs, num_heads, head_dim]; one new token per sequence
  query (prefill):        [num_tokens, num_heads, head_dim]; sequences back to back
  sliding_window:         int or None (keyword); a query at position p sees only keys at
                          positions p - sliding_window < k <= p, the last `sliding_window`
                          tokens including itself (Hugging Face's `sliding_window_overlay`,
                          `kv_idx > q_idx - sliding_window`, shared by Mistral, Qwen2 and
                          Gemma 2/3). None: every earlier position. Block-table entries for
                          blocks wholly before every query's window may point anywhere
                          valid (the scheduler frees those blocks and leaves block 0 there):
                          kernels never read them, nor any slot outside a query's window.
num_heads is a multiple of num_kv_heads (GQA: consecutive query heads share a KV head).
Softmax runs in float32 at least, whatever the cache dtype; outputs have the query's
shape and dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch


class PagedAttentionOps(Protocol):
    """What the model runner needs from a kernel implementation: write K/V into the paged
    cache, then attend over it, for decode (one query token per sequence) and for
    prefill/extend (several new tokens per sequence over a possibly cached prefix)."""

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots,
        converting to the cache dtype; tokens whose slot is < 0 (batch padding) are
        skipped, and nothing else in the cache changes."""
        ...

    def paged_decode_attention(
        self,
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

        Sequence i attends over its first seq_lens[i] cached tokens (the current token's
        K/V already written), or over the last `sliding_window` of them. `max_seq_len`
        (>= every seq_len) lets a device kernel size its grid without reading seq_lens back
        to the host."""
        ...

    def paged_prefill_attention(
        self,
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

        query [num_tokens, num_heads, head_dim]: the q_len = query_start_loc[i + 1] -
        query_start_loc[i] tokens of sequence i sit at positions seq_len - q_len ..
        seq_len - 1 and see every cached position up to their own (the cached prefix and
        this step's tokens, which `reshape_and_cache` wrote first), within `sliding_window`
        of their own position where it is set. `max_query_len` and
        `max_seq_len` bound every sequence's q_len and seq_len (for grid sizing)."""
        ...
