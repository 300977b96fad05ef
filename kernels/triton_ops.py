"""The Triton path behind `kernels.kernel_module` (CUDA): launches the kernels in
`kernels/triton_kernels/` (one module per kernel; their shared design is documented in that
package) and implements `kernels.paged_attention_ops.PagedAttentionOps`, where the tensor
layouts are documented. The tests run these in the Triton interpreter against
`kernels/torch_ops.py`.

Host-side choices:
- No host syncs: grids come from `max_seq_len` / `max_query_len`, which the caller knows,
  and per-sequence lengths are read inside the kernels.
- Decode splits contexts longer than one partition over several programs (split-KV,
  flash-decoding); the partition size is a keyword argument of `paged_decode_attention`
  (default `DEFAULT_PARTITION_SIZE`), so tests exercise the split on small shapes by
  passing a smaller one.
- float64 attention falls back to the torch implementation: the torch path accumulates
  float64 inputs in float64, which these fp32-accumulating kernels would not match, and
  float64 is a reference dtype, never a serving one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels import torch_ops
from pagedserve.kernels.triton_kernels.paged_decode_attention import paged_decode_kernel, reduce_partitions_kernel
from pagedserve.kernels.triton_kernels.paged_prefill_attention import paged_prefill_kernel
from pagedserve.kernels.triton_kernels.reshape_and_cache import reshape_and_cache_kernel

# Tokens of context one decode program reduces before the second kernel combines the
# partial results. Short contexts (<= one partition) skip the split. A power of two, a
# multiple of the block size and >= 16.
DEFAULT_PARTITION_SIZE = 512

# Partial results the reduction kernel combines per loop iteration, by default.
DEFAULT_PARTITIONS_PER_REDUCE_ITER = 64

# Context tokens one decode program loads per loop iteration (whole blocks: a block is
# never split across tiles): big enough to amortise the loop and feed `tl.dot`, small
# enough that a [tile, head_dim] K and V tile fit on chip.
_DECODE_TILE_TOKENS = 128

# Query rows (query tokens x padded query-group heads) one prefill program computes, and
# context tokens it loads per loop iteration (a whole block if blocks are larger).
_PREFILL_ROWS = 64
_PREFILL_TILE_TOKENS = 64

# `tl.dot` needs every dimension >= 16.
_MIN_DOT_DIM = 16


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
    reshape_and_cache_kernel[(num_tokens,)](
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
    partition_size: int = DEFAULT_PARTITION_SIZE,
    partitions_per_reduce_iter: int = DEFAULT_PARTITIONS_PER_REDUCE_ITER,
) -> torch.Tensor:
    """One query token per sequence: query [num_seqs, num_heads, head_dim] -> same shape.

    Contexts longer than `partition_size` tokens are split into partitions reduced by
    parallel programs (so a batch of one long sequence still fills the device), then
    combined, `partitions_per_reduce_iter` partial results per loop iteration (a power
    of two). With a sliding window the partitions cover the window only, so the grid and
    the work are bounded by the window, not by the context.
    """
    if query.dtype == torch.float64:
        return torch_ops.paged_decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len,
            sliding_window=sliding_window,
        )
    _check_window(sliding_window)
    _check_attention_inputs(query, key_cache, value_cache)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    _check_split_sizes(partition_size, partitions_per_reduce_iter, block_size)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0 or max_seq_len <= 0:
        return out.zero_()

    attended = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    num_partitions = triton.cdiv(attended, partition_size)
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
    paged_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
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
        sliding_window or 0,
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
        reduce_partitions_kernel[(num_seqs, num_heads)](
            out,
            partial_out,
            partial_max,
            partial_sum,
            seq_lens,
            max_seq_len,
            sliding_window or 0,
            *out.stride(),
            *partial_out.stride()[:3],
            *partial_max.stride()[:2],
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            PARTITION_SIZE=partition_size,
            PARTS_PER_ITER=min(triton.next_power_of_2(num_partitions), partitions_per_reduce_iter),
            num_warps=4,
        )
    return out


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
    """Varlen causal attention of each sequence's new tokens over its whole cached context
    (see `PagedAttentionOps.paged_prefill_attention`). `max_query_len` sizes the grid, so
    it must be at least every sequence's q_len."""
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
            sliding_window=sliding_window,
        )
    _check_window(sliding_window)
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
    paged_prefill_kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        sliding_window or 0,
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
        HAS_WINDOW=sliding_window is not None,
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


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"a sliding window holds at least 1 token, not {sliding_window}")


def _check_block_size(block_size: int) -> None:
    """Tiles are `tl.arange` ranges made of whole blocks, so sizes must be powers of two."""
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two block size, not {block_size}")


def _check_split_sizes(partition_size: int, partitions_per_reduce_iter: int, block_size: int) -> None:
    _check_block_size(block_size)
    if partition_size & (partition_size - 1):
        raise ValueError(f"partition size {partition_size} must be a power of two")
    if partitions_per_reduce_iter < 1 or partitions_per_reduce_iter & (partitions_per_reduce_iter - 1):
        raise ValueError(
            f"partitions per reduction iteration {partitions_per_reduce_iter} must be a power of two"
        )
    if partition_size < max(block_size, _MIN_DOT_DIM):
        raise ValueError(
            f"partition size {partition_size} must be >= the block size {block_size} and >= "
            f"{_MIN_DOT_DIM}"
        )
