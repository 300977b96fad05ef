"""Int8 weights with one float32 scale per 32 input columns, multiplied on CPU by the C
kernel of `kernels/csrc/q8_matmul_cpu.c` (see there for the layout and why).

`quantize` makes the kernel's layout from a dense weight; `q8_matmul` multiplies. Where the
library cannot be built, `available()` is False (after one warning) and callers keep their
dense weight.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from pagedserve.kernels.native_build import load_function

logger = logging.getLogger(__name__)

BLOCK = 16  # output rows side by side in the layout
GROUP = 32  # input columns per scale


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [pointer, pointer, int64, pointer, pointer, int64, int64]
    return load_function("q8_matmul_cpu", "pagedserve_q8_matmul", argtypes, None, logger, "the int8 LM head")


def available() -> bool:
    return _kernel() is not None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float -> (codes int8 [rows / 16, cols, 16], scales float32 [rows / 16,
    cols / 32, 16]): per 32 columns of a row, scale = max |w| / 127 and code = round(w /
    scale), so every weight is within half a step of its code times the scale."""
    rows, cols = weight.shape
    if rows % BLOCK or cols % GROUP:
        raise ValueError(f"int8 blocks need rows divisible by {BLOCK} and columns by {GROUP}; got [{rows}, {cols}]")
    groups = weight.detach().to(torch.float32).reshape(rows, cols // GROUP, GROUP)
    scales = groups.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # [rows, groups]
    codes = torch.round(groups / scales[..., None]).clamp_(-127, 127).to(torch.int8).reshape(rows, cols)
    return (
        codes.reshape(rows // BLOCK, BLOCK, cols).transpose(1, 2).contiguous(),
        scales.reshape(rows // BLOCK, BLOCK, cols // GROUP).transpose(1, 2).contiguous(),
    )


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 [rows, cols] weight `quantize`'s output stands for (tests)."""
    blocks, cols, _ = codes.shape
    weight = codes.to(torch.float32) * scales.repeat_interleave(GROUP, dim=1)  # [blocks, cols, 16]
    return weight.transpose(1, 2).reshape(blocks * BLOCK, cols)


def q8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, cols] @ w.T -> float32 [M, rows] (x is widened to float32 first)."""
    blocks, cols, _ = codes.shape
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], blocks * BLOCK, dtype=torch.float32)
    _kernel()(out.data_ptr(), x.data_ptr(), x.shape[0], codes.data_ptr(), scales.data_ptr(), blocks * BLOCK, cols)
    return out
