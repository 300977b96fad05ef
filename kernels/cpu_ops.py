"""The CPU serving path: decode attention and the cache write from the C kernels in
`kernels/csrc/paged_attention_cpu.c` and `reshape_and_cache_cpu.c`, prefill attention from
`kernels/torch_ops.py`.

Implements `kernels.paged_attention_ops.PagedAttentionOps` like `torch_ops`. Decode
attention is where the CPU spends its time (the torch version gathers each sequence's
blocks into a padded copy before attending; the C kernel reads the blocks in place, several
times faster); prefill attention is compute-bound and SDPA already does it well.

The C decode kernel takes float32 or bfloat16 on CPU (bf16 accumulated in float32, as
torch_ops does); other dtypes (float64 for the exactness tests, float16) go to torch_ops.
The cache write copies rows as bytes, any dtype, where they already have the cache's dtype
(a cast goes to torch_ops). Where a kernel cannot be built (no C compiler) serving still
works on torch_ops, with one warning in the log.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from pagedserve.kernels import torch_ops
from pagedserve.kernels.native_build import NativeBuildError, load_function, load_library

__all__ = ["native_decode_attention", "paged_decode_attention", "paged_prefill_attention", "reshape_and_cache"]

paged_prefill_attention = torch_ops.paged_prefill_attention

logger = logging.getLogger(__name__)

_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64


_NATIVE_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # -> the C function's suffix


@functools.cache
def _decode_kernel(dtype: torch.dtype = torch.float32) -> ctypes._CFuncPtr:
    function = getattr(load_library("paged_attention_cpu"), f"pagedserve_decode_attention_{_NATIVE_DTYPES[dtype]}")
    function.restype = ctypes.c_int
    function.argtypes = [_POINTER] * 5 + [_INT64, _POINTER] + [_INT64] * 6 + [ctypes.c_float]
    return function


@functools.cache
def _decode_kernel_or_none() -> ctypes._CFuncPtr | None:
    try:
        return _decode_kernel()
    except NativeBuildError as error:
        logger.warning("CPU decode attention falls back to the slower torch path: %s", error)
        return None


@functools.cache
def _cache_kernel() -> ctypes._CFuncPtr | None:
    argtypes = [_POINTER, _POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _INT64, _INT64, _INT64]
    return load_function(
        "reshape_and_cache_cpu", "pagedserve_reshape_and_cache", argtypes, ctypes.c_int, logger, "the KV cache write"
    )


def _rows_fit_cache(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """The C cache write's conditions: one dtype, CPU, dense rows of the cache's shape, a
    slot for every row (the C kernel reads one per row: a mismatch goes to torch's error)."""
    dtype, row_shape = cache.dtype, cache.shape[2:]
    return (
        cache.device.type == "cpu" and cache.is_contiguous()
        and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous() and slot_mapping.device.type == "cpu"
        and slot_mapping.dim() == 1 and slot_mapping.shape[0] == key.shape[0] == value.shape[0]
        and all(
            t.dtype == dtype and t.device.type == "cpu" and t.shape[1:] == row_shape
            and t.stride(2) == 1 and t.stride(1) == row_shape[1]
            for t in (key, value)
        )
    )


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots."""
    kernel = _cache_kernel()
    if (
        kernel is None or value_cache.shape != key_cache.shape or not value_cache.is_contiguous()
        or value_cache.dtype != key_cache.dtype or not _rows_fit_cache(key, value, key_cache, slot_mapping)
    ):
        torch_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    item = key_cache.element_size()
    failed = kernel(
        key.data_ptr(), value.data_ptr(), key.stride(0) * item, value.stride(0) * item, key_cache.data_ptr(),
        value_cache.data_ptr(), slot_mapping.data_ptr(), key.shape[0], num_kv_heads * head_dim * item,
        num_blocks * block_size,
    )
    if failed:
        raise IndexError(f"a slot in slot_mapping is past the KV cache's {num_blocks * block_size:,} slots")


def _native_supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    return query.dtype in _NATIVE_DTYPES and all(
        t.dtype == query.dtype and t.device.type == "cpu" for t in (query, key_cache, value_cache)
    )


def native_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The C kernel itself (no fallback): raises NativeBuildError where it cannot be built
    and ValueError for inputs it does not take."""
    if not _native_supports(query, key_cache, value_cache):
        raise ValueError("the C decode kernel takes float32 or bfloat16 CPU tensors, all of one dtype")
    # Conversions and copies only where needed: the runner's metadata is int32 and
    # contiguous already, and at decode this runs once per layer.
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if num_heads % num_kv_heads or head_dim != cache_head_dim or value_cache.shape != key_cache.shape:
        raise ValueError(f"query {tuple(query.shape)} does not fit the cache {tuple(key_cache.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"a sliding window holds at least 1 token, not {sliding_window}")
    if not query.is_contiguous():
        query = query.contiguous()
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        key_cache, value_cache = key_cache.contiguous(), value_cache.contiguous()
    if block_tables.dtype != torch.int32 or not block_tables.is_contiguous():
        block_tables = block_tables.to(torch.int32).contiguous()
    if seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(query)
    failed = _decode_kernel(query.dtype)(
        out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.shape[1] if block_tables.dim() == 2 else 0, seq_lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, sliding_window or 0, scale,
    )
    if failed:
        raise MemoryError("the C decode kernel could not allocate its workspace")
    return out


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
    """One query token per sequence: query [num_seqs, num_heads, head_dim] -> same shape."""
    if query.shape[0] > 0 and _native_supports(query, key_cache, value_cache) and _decode_kernel_or_none():
        return native_decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window=sliding_window
        )
    return torch_ops.paged_decode_attention(
        query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len, sliding_window=sliding_window
    )
