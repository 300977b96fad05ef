"""Tests for `kernels/rotary.py`: the RoPE C kernel (built for real) against the torch path
bit for bit, and the torch path against HF's own `apply_rotary_pos_emb`, on fresh random
inputs of several shapes, GQA included."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pagedserve.kernels import rotary
from tests.kernels.paged_cache import seeded_generator

# (tokens, query heads, KV heads, head_dim): one decode token of the embedded model (9 + 3
# heads of 64), a prefill chunk, MHA with wide heads, a head_dim that is no vector multiple.
_SHAPES = [(1, 9, 3, 64), (37, 9, 3, 64), (5, 4, 4, 128), (3, 2, 1, 20)]


def _inputs(gen: torch.Generator, tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """q and k as the model hands them over: one view into the fused qkv rows (v after them),
    and cos/sin rows of random positions."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    angles = torch.rand(tokens, head_dim // 2, generator=gen, dtype=torch.float64) * 100
    return qk, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "head_dim"), _SHAPES)
def test_native_rotary_is_the_torch_path_bit_for_bit(
    request: pytest.FixtureRequest, tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    assert rotary._kernel(dtype) is not None  # the C path is what runs here
    qk, cos, sin = _inputs(seeded_generator(request), tokens, heads, kv_heads, head_dim, dtype)
    out = rotary.apply_rotary(qk, cos, sin)
    expected = rotary.rotary_reference(qk, cos, sin)
    assert out.is_contiguous() and out.dtype == dtype and out.shape == qk.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_rotary_equals_hf_apply_rotary_pos_emb(request: pytest.FixtureRequest, dtype: torch.dtype) -> None:
    """HF rotates [batch, heads, tokens, head_dim] with full-width cos/sin (one half twice)."""
    heads, kv_heads, head_dim = 9, 3, 64
    qk, cos, sin = _inputs(seeded_generator(request), 11, heads, kv_heads, head_dim, dtype)
    out = rotary.apply_rotary(qk, cos, sin)
    full_cos, full_sin = torch.cat([cos, cos], dim=-1)[None], torch.cat([sin, sin], dim=-1)[None]
    hf_q, hf_k = apply_rotary_pos_emb(
        qk[:, :heads].transpose(0, 1)[None], qk[:, heads:].transpose(0, 1)[None], full_cos, full_sin
    )
    assert torch.equal(out[:, :heads], hf_q[0].transpose(0, 1))
    assert torch.equal(out[:, heads:], hf_k[0].transpose(0, 1))


def test_mismatched_tables_are_refused() -> None:
    qk = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="do not fit"):
        rotary.apply_rotary(qk, torch.zeros(3, 4), torch.zeros(3, 4))
