"""Tests for `kernels/rms_norm.py`: the fused residual add + RMSNorm C kernel (built for
real) against HF's own `LlamaRMSNorm` module, on fresh random rows of several shapes."""

from __future__ import annotations

import pytest
import torch

from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pagedserve.kernels import rms_norm
from tests.kernels.paged_cache import seeded_generator


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF transformers' LlamaRMSNorm with this weight: the independent reference."""
    norm = LlamaRMSNorm(weight.shape[0], eps)
    norm.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    with torch.no_grad():
        return norm(x)

# (rows, hidden): one decode token, a batch under and over the kernel's threading cut-off,
# a hidden size that is no multiple of the vector width.
_SHAPES = [(1, 576), (7, 576), (48, 576), (20, 131)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "hidden"), _SHAPES)
def test_fused_add_rms_norm_matches_hf_ops(request: pytest.FixtureRequest, rows: int, hidden: int, dtype: torch.dtype) -> None:
    assert rms_norm._kernel(dtype) is not None  # the C path is what runs here
    gen = seeded_generator(request)
    residual = (3 * torch.randn(rows, hidden, generator=gen)).to(dtype)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    expected_residual = residual + x
    expected = hf_rms_norm(expected_residual, weight, 1e-5)

    updated = residual.clone()
    out = rms_norm.add_rms_norm(x.clone(), updated, weight, 1e-5)
    assert torch.equal(updated, expected_residual)  # the add rounds exactly as torch's
    assert out.dtype == dtype and out.shape == (rows, hidden)
    # Only the order of the float32 sum of squares differs: float32 rounding, then at most
    # one bf16 rounding step of the normalised row.
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(out, expected, **tolerance)

    alone = residual.clone()
    torch.testing.assert_close(rms_norm.add_rms_norm(None, alone, weight, 1e-5),
                               hf_rms_norm(residual, weight, 1e-5), **tolerance)
    assert torch.equal(alone, residual)  # nothing to add: the residual is left as it was


def test_float64_and_strided_inputs_take_hf_ops_bit_for_bit(request: pytest.FixtureRequest) -> None:
    """The exactness tests run in float64: the norm there must be HF's own ops."""
    gen = seeded_generator(request)
    residual = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    weight = torch.randn(64, generator=gen, dtype=torch.float64)
    updated = residual.clone()
    out = rms_norm.add_rms_norm(x, updated, weight, 1e-6)
    assert torch.equal(updated, residual + x)
    assert torch.equal(out, hf_rms_norm(residual + x, weight, 1e-6))
    wide = torch.randn(5, 128, generator=gen)
    strided = wide[:, ::2]
    base = torch.randn(5, 64, generator=gen)
    updated = base.clone()
    out = rms_norm.add_rms_norm(strided, updated, weight.float(), 1e-6)
    assert torch.equal(out, hf_rms_norm(base + strided, weight.float(), 1e-6))
