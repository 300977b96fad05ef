"""The CPU serving path: decode attention from the C kernel in
`kernels/csrc/paged_attention_cpu.c`, everything else from `kernels/torch_ops.py`.

Implements `kernels.paged_attention_ops.PagedAttentionOps` like `torch_ops`. Decode
attention is where the CPU spends its time (the torch version gathers each sequence's
blocks into a padded copy before attending; the C kernel reads the blocks in place, several
times faster); prefill attention is compute-bound and SDPA already does it well.

The C kernel takes float32 or bfloat16 on CPU (bf16 accumulated in float32, as torch_ops
does); other dtypes (float64 for the exactness tests, float16) go to torch_ops. Where the kernel cannot be
built (no C compiler) serving still works on torch_ops, with one warning in the log.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from kernels import torch_ops
from kernels.native_build import NativeBuildError, load_library

__all__ = ["native_decode_attention", "paged_decode_attention", "paged_prefill_attention", "reshape_and_cache"]

reshape_and_cache = torch_ops.reshape_and_cache
paged_prefill_attention = torch_ops.paged_prefill_attention

logger = logging.getLogger(__name__)

_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64


_NATIVE_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # -> the C function's suffix


@functools.cache
def _decode_kernel(dtype: torch.dtype = torch.float32) -> ctypes._CFuncPtr:
    function = getattr(load_library("paged_attention_cpu"), f"pagedserve_decode_attention_{_NATIVE_DTYPES[dtype]}")
    function.restype = ctypes.c_int
    function.argtypes = [_POINTER] * 5 + [_INT64, _POINTER] + [_INT64] * 5 + [ctypes.c_float]
    return function


@functools.cache
def _decode_kernel_or_none() -> ctypes._CFuncPtr | None:
    try:
        return _decode_kernel()
    except NativeBuildError as error:
        logger.warning("CPU decode attention falls back to the slower torch path: %s", error)
        return None


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
) -> torch.Tensor:
    """The C kernel itself (no fallback): raises NativeBuildError where it cannot be built
    and ValueError for inputs it does not take."""
    if not _native_supports(query, key_cache, value_cache):
        raise ValueError("the C decode kernel takes float32 or bfloat16 CPU tensors, all of one dtype")
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if num_heads % num_kv_heads or head_dim != cache_head_dim or value_cache.shape != key_cache.shape:
        raise ValueError(f"query {tuple(query.shape)} does not fit the cache {tuple(key_cache.shape)}")
    query = query.contiguous()
    key_cache, value_cache = key_cache.contiguous(), value_cache.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(query)
    failed = _decode_kernel(query.dtype)(
        out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.shape[1] if block_tables.dim() == 2 else 0, seq_lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale,
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
) -> torch.Tensor:
    """One query token per sequence: query [num_seqs, num_heads, head_dim] -> same shape."""
    if query.shape[0] > 0 and _native_supports(query, key_cache, value_cache) and _decode_kernel_or_none():
        return native_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale)
    return torch_ops.paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len)
