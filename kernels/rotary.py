"""Rotary position embedding, HF's "rotate half" layout: `x1 * cos - x2 * sin` and
`x2 * cos + x1 * sin` per head (x1, x2 its two halves).

On CPU in float32 or bfloat16 the C kernel of `kernels/csrc/rotary_cpu.c` does it in one
call with torch's rounding, op for op (the same bits); elsewhere (float64 for the exactness
tests, CUDA, no C compiler) torch ops do.
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
    argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3
    return load_function("rotary_cpu", f"pagedserve_rotary_{_SUFFIX[dtype]}", argtypes, None, logger, "rotary embedding")


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The torch path: HF's `x * cos + rotate_half(x) * sin` computed per half (the same
    products and sums, so the same bits, without rotate_half's negated copy)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=first)
    first.sub_(x2 * sin)
    torch.mul(x2, cos, out=second)
    second.add_(x1 * sin)
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, num_heads, head_dim] (heads dense within a token, any token stride)
    and cos, sin [num_tokens, head_dim / 2] of each token's position -> a rotated,
    contiguous copy of x."""
    dtype = x.dtype
    if (
        dtype not in _SUFFIX or x.device.type != "cpu" or x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]
        or cos.dtype != dtype or sin.dtype != dtype or not (cos.is_contiguous() and sin.is_contiguous())
        or cos.device.type != "cpu" or sin.device.type != "cpu"
    ):
        return rotary_reference(x, cos, sin)
    kernel = _kernel(dtype)
    if kernel is None:
        return rotary_reference(x, cos, sin)
    num_tokens, num_heads, head_dim = x.shape
    if cos.shape != (num_tokens, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)}")
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=dtype)
    kernel(out.data_ptr(), x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), num_tokens, num_heads, head_dim)
    return out
