"""Fused residual add + RMSNorm: `residual += x; out = rms_norm(residual)` (x optional).

On CPU in float32 or bfloat16 the C kernel of `kernels/csrc/rms_norm_cpu.c` does it in one
pass per row; elsewhere (float64 for the exactness tests, CUDA, no C compiler) torch does
it in HF's own sequence of ops, so float64 results stay HF's bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from pagedserve.kernels.native_build import load_function

logger = logging.getLogger(__name__)

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def _kernel(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
    return load_function("rms_norm_cpu", f"pagedserve_add_rms_norm_{_SUFFIX[dtype]}", argtypes, None, logger, "RMSNorm")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: statistics in float32 whatever the dtype (float64 included)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _native(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor) -> ctypes._CFuncPtr | None:
    tensors = [residual, weight] + ([x] if x is not None else [])
    if residual.dtype not in _SUFFIX or residual.device.type != "cpu" or residual.dim() != 2:
        return None
    if any(t.dtype != residual.dtype or not t.is_contiguous() for t in tensors):
        return None
    if x is not None and x.shape != residual.shape:
        return None
    return _kernel(residual.dtype)


def add_rms_norm(
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Adds x into `residual` in place (when given) and returns RMSNorm(residual) * weight,
    possibly written over x. residual, x: [rows, hidden]; weight: [hidden]."""
    kernel = _native(x, residual, weight)
    if kernel is None:
        if x is not None:
            residual.add_(x)
        return rms_norm_reference(residual, weight, eps)
    out = x if x is not None else torch.empty_like(residual)  # x is spent once added: reuse it
    rows, cols = residual.shape
    kernel(out.data_ptr(), residual.data_ptr(), x.data_ptr() if x is not None else None, weight.data_ptr(), rows, cols, eps)
    return out
