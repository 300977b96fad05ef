"""4-bit GGUF weights kept quantized: torch's weight-only int4 matmul on CPU.

Why: a 4-bit weight is a quarter of the bytes of a bf16 one and an eighth of fp32, and a
decode step at small batch is bound by how fast the weights stream from memory. torch 2.13
has `_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)`, which computes
`x @ w.T` with `w = (code - 8) * scale + zero` per group of `group_size` input columns,
codes 0..15. GGUF's 4-bit formats map onto it exactly, group for group (32 columns):
  Q4_1  w = d * code + m        ->  scale = d, zero = m + 8 d
  Q4_0  w = d * (code - 8)      ->  scale = d, zero = 0
The only loss is storing scale and zero in bfloat16, which the kernel requires (its float32
variant is a slow reference path here: 25x slower measured); hence "within bf16 tolerance".
Activations enter the kernel in bfloat16 and leave in the model's dtype.

Other GGUF types (Q8_0: one scale per 32 columns, which `_weight_int8pack_mm`'s single
per-row scale cannot represent exactly; F32, F16, K-quants) are dequantized at load.

Which is faster depends on the rows a step multiplies (measured, `benchmarks/cpu_speed.py`
and docs/cpu-path.md): with few rows a step streams the weights and int4's quarter of the bytes
wins (batch 1: 1.8x bf16); with more, the matmul computes, and int4's kernel (which widens
every group for every row) loses to oneDNN's bf16 GEMM (batch 8: 0.78x, prefill far worse).
So `--weight-format auto` keeps both: the packed weights for steps of at most
`int4_max_rows` rows (decode of a few sequences) and the dense ones for the rest, at the
cost of the int4 bytes on top of the dense (+45% of bf16 weights); `quantized` keeps only
the packed weights (least memory), `dequantized` only the dense ones.

The LM head of a small model is its largest matmul (SmolLM2-135M: 49152 x 576, tied to the
Q8_0 embedding table), and at decode it too streams its weight for a few rows. Wherever
4-bit weights stay packed it gets an int8 copy as well (`Int8Linear`: one scale per 32
columns, like Q8_0, for the C kernel of `kernels/q8_matmul.py`), used for steps of at most
`StepPaths.int8_lm_head_max_rows` rows (the cut-offs: `step_paths.py`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import q8_matmul
from pagedserve.services.executor.step_paths import StepPaths

GROUP_SIZE = 32  # GGUF's 4-bit block: one scale (and min) per 32 weights of a row

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int4Weight:
    """A [rows, cols] weight as codes 0..15 with a scale and a zero per 32 columns:
    `w[r, c] = (codes[r, c] - 8) * scales[r, c // 32] + zeros[r, c // 32]` (float32 here;
    packing for the kernel rounds scales and zeros to bfloat16)."""

    codes: np.ndarray  # uint8 [rows, cols]
    scales: np.ndarray  # float32 [rows, cols / 32]
    zeros: np.ndarray  # float32 [rows, cols / 32]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.codes.shape
        return rows, cols

    @classmethod
    def from_q4_1(cls, blocks: np.ndarray, rows: int, cols: int) -> Int4Weight:
        """GGUF Q4_1 rows: per 32 weights 20 bytes: d (fp16), m (fp16), 16 bytes of codes
        (low nibbles are weights 0..15, high nibbles 16..31)."""
        raw = blocks.reshape(rows, cols // GROUP_SIZE, 20)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return cls(_codes(raw[..., 4:], rows, cols), d, m + 8 * d)

    @classmethod
    def from_q4_0(cls, blocks: np.ndarray, rows: int, cols: int) -> Int4Weight:
        """GGUF Q4_0 rows: per 32 weights 18 bytes: d (fp16), 16 bytes of codes."""
        raw = blocks.reshape(rows, cols // GROUP_SIZE, 18)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        return cls(_codes(raw[..., 2:], rows, cols), d, np.zeros_like(d))

    def take_rows(self, index: np.ndarray | slice) -> Int4Weight:
        """Some rows, in the given order (the rotary un-permutation, a rank's heads)."""
        return Int4Weight(self.codes[index], self.scales[index], self.zeros[index])

    def take_cols(self, start: int, length: int) -> Int4Weight:
        """Columns start..start+length (a row-parallel rank's input slice): whole groups only."""
        if start % GROUP_SIZE or length % GROUP_SIZE:
            raise ValueError(
                f"a 4-bit GGUF weight splits by groups of {GROUP_SIZE} columns, but this rank's slice is "
                f"columns {start:,}..{start + length:,}: choose another --tensor-parallel-size or --weight-format dequantized"
            )
        groups = slice(start // GROUP_SIZE, (start + length) // GROUP_SIZE)
        return Int4Weight(self.codes[:, start : start + length], self.scales[:, groups], self.zeros[:, groups])

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """Stacked by rows: the fused q/k/v and gate/up projections."""
        return Int4Weight(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("codes", "scales", "zeros")))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the codes stand for (exact in float32)."""
        expand = lambda a: np.repeat(a, GROUP_SIZE, axis=1)  # noqa: E731
        return torch.from_numpy((self.codes.astype(np.float32) - 8) * expand(self.scales) + expand(self.zeros))


def _codes(nibbles: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[rows, groups, 16] bytes -> uint8 [rows, cols]: low nibbles first, then high."""
    return np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)


class Int4Linear(nn.Module):
    """`y = x @ w.T (+ bias)` with w packed for `_weight_int4pack_mm_for_cpu`; with a
    `dense` copy of w too, inputs of more than `max_rows` rows use the dense one.

    packed: uint8 [rows, cols / 2] (torch's own CPU layout); scales_and_zeros: bfloat16
    [cols / 32, rows, 2]; dense: [rows, cols] in the model dtype."""

    def __init__(
        self, weight: Int4Weight, bias: torch.Tensor | None = None, dense: torch.Tensor | None = None,
        max_rows: int = sys.maxsize,
    ) -> None:
        super().__init__()
        self.register_buffer("dense", dense)
        self.max_rows = max_rows if dense is not None else sys.maxsize
        rows, cols = weight.shape
        if rows % 16 or cols % GROUP_SIZE:
            raise ValueError(f"int4 packing needs rows divisible by 16 and columns by {GROUP_SIZE}; got [{rows}, {cols}]")
        self.in_features, self.out_features = cols, rows
        codes = torch.from_numpy(np.ascontiguousarray(weight.codes)).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scales_and_zeros = np.stack([weight.scales.T, weight.zeros.T], axis=-1)  # [groups, rows, 2]
        self.register_buffer("scales_and_zeros", torch.from_numpy(np.ascontiguousarray(scales_and_zeros)).to(torch.bfloat16))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.numel() > self.max_rows * self.in_features:
            return F.linear(x, self.dense, self.bias)
        # The kernel takes a contiguous bf16 [M, K]: one conversion (or copy) at most, none
        # for the usual 2-D contiguous bf16 input (each skipped call saves dispatch time).
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if flat.dtype != torch.bfloat16 or not flat.is_contiguous():
            flat = flat.to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP_SIZE, self.scales_and_zeros)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out.add_(self.bias)
        return out


class Int8Linear(nn.Module):
    """`y = x @ w.T` for steps of at most `max_rows` rows from w requantized to int8 with
    one float32 scale per 32 columns (`kernels/q8_matmul.py`, a C kernel; float32
    activations), and from the dense w for larger steps.

    The dense weight is the linear's own parameter, kept by reference: for a head tied to
    the embedding table it costs nothing more. Requantizing puts each weight within half a
    step (1/127 of its group's largest) of the dense one, the granularity of the GGUF's own
    Q8_0 blocks: within bf16 tolerance of the dense product."""

    def __init__(self, dense: torch.Tensor, max_rows: int) -> None:
        super().__init__()
        self.out_features, self.in_features = dense.shape
        self.max_rows = max_rows
        self.register_buffer("dense", dense)
        codes, scales = q8_matmul.quantize(dense)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.max_rows * self.in_features:
            return F.linear(x, self.dense)
        out = q8_matmul.q8_matmul(x.reshape(-1, self.in_features), self.codes, self.scales)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def int4_max_rows(
    weight_format: str, dtype: torch.dtype, device: torch.device, is_gguf: bool, step_paths: StepPaths
) -> tuple[int, str]:
    """How many rows of a step at most go through int4 matmuls (0: the weights are all
    dense; sys.maxsize: all packed; auto: the table's cut-off), and why (logged once at
    start).

    float64 (the exactness tests) and devices other than CPU always expand the weights;
    asking for quantized there is refused with the reason."""
    if not is_gguf:
        return 0, "weights are not GGUF"
    if weight_format == "dequantized":
        return 0, "weight format dequantized as configured"
    refusal = None
    if device.type != "cpu":
        refusal = f"the int4 kernel runs on CPU only, not {device.type}"
    elif step_paths.int4_max_rows(dtype) is None:
        refusal = f"quantized matmuls are bf16-exact at best, not {str(dtype).removeprefix('torch.')}-exact"
    if refusal is not None:
        if weight_format == "quantized":
            raise ValueError(f"--weight-format quantized is not available: {refusal}; use --weight-format dequantized")
        return 0, f"weight format auto: dequantized, {refusal}"
    if weight_format == "quantized":
        return sys.maxsize, f"weight format quantized: 4-bit GGUF tensors stay packed (int4, groups of {GROUP_SIZE})"
    rows = step_paths.int4_max_rows(dtype)
    assert rows is not None  # refused above otherwise
    return rows, (
        f"weight format auto: 4-bit GGUF tensors packed (int4) for steps of up to {rows} rows, "
        "and dense for larger ones"
    )
