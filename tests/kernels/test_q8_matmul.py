"""The int8 (one scale per 32 columns) matmul of `kernels/q8_matmul.py` against float64
torch on fresh random weights, several shapes, up to and past the 4 rows one pass takes."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import q8_matmul


@pytest.mark.parametrize(("rows", "cols", "num_rows"), [(16, 32, 1), (48, 96, 2), (256, 576, 4), (160, 1536, 7)])
def test_q8_matmul_matches_the_requantized_weight(rows: int, cols: int, num_rows: int) -> None:
    generator = torch.Generator().manual_seed(rows * cols + num_rows)
    weight = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator)
    codes, scales = q8_matmul.quantize(weight)
    assert codes.shape == (rows // 16, cols, 16) and scales.shape == (rows // 16, cols // 32, 16)
    requantized = q8_matmul.dequantize(codes, scales)
    # Every weight within half a step of its group's scale.
    step = scales.transpose(1, 2).reshape(rows, cols // 32).repeat_interleave(32, dim=1)
    assert bool(((requantized - weight).abs() <= step * (0.5 + 1e-6)).all())
    x = torch.randn(num_rows, cols, generator=generator)
    expected = x.double() @ requantized.double().T
    got = q8_matmul.q8_matmul(x, codes, scales)
    assert got.dtype == torch.float32 and got.shape == (num_rows, rows)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_shapes_off_the_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="rows divisible by 16"):
        q8_matmul.quantize(torch.randn(20, 64))
    with pytest.raises(ValueError, match="columns by 32"):
        q8_matmul.quantize(torch.randn(16, 48))
