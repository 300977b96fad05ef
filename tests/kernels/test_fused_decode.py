"""The fused C decode step (`kernels/fused_decode.py`) and its int4 matmul against float64
torch references written here, on fresh random weights, caches and contexts, several shapes
(GQA groups of 1, 2 and 3, head sizes 32 and 64, block sizes 4 and 16, more rows than one
matmul pass takes)."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.kernels.fused_decode import (
    FusedDecoder,
    LayerWeights,
    Q4Tensor,
    bf16_dot_products,
    q4_matmul,
    torch_layout_matches,
    unavailable_reason,
)


def random_q4(rows: int, cols: int, generator: torch.Generator) -> tuple[Q4Tensor, torch.Tensor]:
    """A random 4-bit weight and the float64 weight it stands for."""
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=generator)
    scales = (torch.rand(cols // 32, rows, generator=generator, dtype=torch.float64) * 0.04 + 0.01).to(torch.bfloat16)
    zeros = (torch.randn(cols // 32, rows, generator=generator, dtype=torch.float64) * 0.1).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    expand = lambda t: t.to(torch.float64).repeat_interleave(32, dim=0).T  # noqa: E731 [rows, cols]
    dense = (codes.to(torch.float64) - 8) * expand(scales) + expand(zeros)
    return Q4Tensor(packed, torch.stack([scales, zeros], dim=-1).contiguous()), dense


def test_torch_packs_int4_as_the_kernel_reads_it() -> None:
    # torch is pinned; a torch that packs otherwise turns the C step off (see unavailable_reason).
    assert torch_layout_matches()


@pytest.mark.parametrize("bf16_activations", [False, True])
@pytest.mark.parametrize(("rows", "cols", "num_rows"), [(64, 32, 1), (960, 576, 3), (3072, 576, 4), (128, 1536, 7)])
def test_q4_matmul_matches_the_dequantized_weight(rows: int, cols: int, num_rows: int, bf16_activations: bool) -> None:
    generator = torch.Generator().manual_seed(rows + cols + num_rows)
    weight, dense = random_q4(rows, cols, generator)
    x = torch.randn(num_rows, cols, generator=generator)
    if bf16_activations and not bf16_dot_products():
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            q4_matmul(x, weight, bf16_activations=True)
        return
    expected = (x.to(torch.bfloat16) if bf16_activations else x).to(torch.float64) @ dense.T
    got = q4_matmul(x, weight, bf16_activations)
    assert got.shape == (num_rows, rows)
    torch.testing.assert_close(got.to(torch.float64), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim], cos/sin [tokens, head_dim / 2]: HF's rotate-half RoPE."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def reference_step(model: dict, embedded, cos, sin, caches, slots, tables, seq_lens):
    """The decode step in float64 torch ops; `caches` (model dtype) get the new K/V, and
    attention reads them back from there, as the C step does. With `round_inputs`, every
    matmul's input is rounded to bfloat16 first, as the C step's bf16 dot products do."""
    heads, kv_heads, head_dim, eps = model["heads"], model["kv_heads"], model["head_dim"], model["eps"]
    r = (lambda x: x.to(torch.bfloat16).to(torch.float64)) if model["round_inputs"] else (lambda x: x)  # noqa: E731
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    residual = embedded.to(torch.float64)
    cos, sin = cos.to(torch.float64), sin.to(torch.float64)
    sublayer = None
    # Per layer: its window (None: all) and KV group (the index into 3-D slots/tables).
    windows = model.get("windows") or [None] * len(caches)
    kv_groups = model.get("kv_groups") or [0] * len(caches)
    all_slots, all_tables = (slots, tables) if tables.dim() == 3 else (slots[None], tables[None])
    for layer, (key_cache, value_cache), window, kv_group in zip(model["layers"], caches, windows, kv_groups):
        slots, tables = all_slots[kv_group], all_tables[kv_group]
        if sublayer is not None:
            residual = residual + sublayer
        qkv = r(rms_norm(residual, layer["input_norm"], eps)) @ layer["qkv"].T
        tokens = qkv.shape[0]
        qk = rotate(qkv[:, : q_size + kv_size].reshape(tokens, heads + kv_heads, head_dim), cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, q_size + kv_size :].reshape(tokens, kv_heads, head_dim)
        flat_k, flat_v = key_cache.view(-1, kv_heads, head_dim), value_cache.view(-1, kv_heads, head_dim)
        flat_k[slots] = k.to(key_cache.dtype)
        flat_v[slots] = v.to(value_cache.dtype)
        block_size = key_cache.shape[1]
        out = []
        for t in range(tokens):
            seq_len = int(seq_lens[t])
            positions = torch.arange(0 if window is None else max(0, seq_len - window), seq_len)
            context = tables[t, positions // block_size].long() * block_size + positions % block_size
            keys = flat_k[context].to(torch.float64).repeat_interleave(heads // kv_heads, dim=1)  # [ctx, heads, d]
            values = flat_v[context].to(torch.float64).repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.einsum("hd,chd->hc", q[t], keys) / math.sqrt(head_dim)
            out.append(torch.einsum("hc,chd->hd", scores.softmax(-1), values).reshape(q_size))
        residual = residual + r(torch.stack(out)) @ layer["o"].T
        gate, up = (r(rms_norm(residual, layer["post_norm"], eps)) @ layer["gate_up"].T).chunk(2, dim=-1)
        sublayer = r(torch.nn.functional.silu(gate) * up) @ layer["down"].T
    return rms_norm(residual + sublayer, model["final_norm"], eps)


SHAPES = [
    # hidden, heads, kv_heads, head_dim, intermediate, layers, block_size
    (128, 4, 2, 32, 256, 2, 16),
    (192, 3, 1, 64, 128, 3, 4),
    (64, 2, 2, 32, 192, 2, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_fused_decode_step_matches_a_float64_reference(dtype: torch.dtype, shape: tuple, rows: int) -> None:
    hidden, heads, kv_heads, head_dim, inter, num_layers, block_size = shape
    generator = torch.Generator().manual_seed(1000 * SHAPES.index(shape) + 10 * rows + (dtype == torch.bfloat16))
    eps = 1e-5
    layers, reference_layers = [], []
    for _ in range(num_layers):
        qkv, qkv64 = random_q4((heads + 2 * kv_heads) * head_dim, hidden, generator)
        o, o64 = random_q4(hidden, heads * head_dim, generator)
        gate_up, gate_up64 = random_q4(2 * inter, hidden, generator)
        down, down64 = random_q4(hidden, inter, generator)
        norms = [(1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype) for _ in range(2)]
        layers.append(LayerWeights(norms[0], qkv, o, norms[1], gate_up, down))
        reference_layers.append(dict(input_norm=norms[0].double(), post_norm=norms[1].double(), qkv=qkv64, o=o64,
                                     gate_up=gate_up64, down=down64))
    final_norm = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype)
    decoder = FusedDecoder(layers, final_norm, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, eps=eps,
                           dtype=dtype)

    # Contexts of random lengths in shuffled blocks of a cache full of earlier tokens.
    num_blocks = 40
    seq_lens = torch.randint(1, 6 * block_size, (rows,), generator=generator).to(torch.int32)
    max_blocks = int((seq_lens.max() + block_size - 1) // block_size)
    tables = torch.randperm(num_blocks, generator=generator)[: rows * max_blocks].reshape(rows, max_blocks).to(torch.int32)
    slots = torch.tensor([int(tables[t, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for t, n in enumerate(seq_lens.tolist())], dtype=torch.int64)
    caches = [tuple(torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
                    for _ in range(2)) for _ in range(num_layers)]
    reference_caches = [tuple(c.clone() for c in pair) for pair in caches]
    embedded = torch.randn(rows, hidden, generator=generator).to(dtype)
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    got = decoder(embedded, cos, sin, caches, slots, tables, seq_lens)
    expected = reference_step(
        dict(layers=reference_layers, final_norm=final_norm.double(), heads=heads, kv_heads=kv_heads,
             head_dim=head_dim, eps=eps, round_inputs=dtype == torch.bfloat16 and bf16_dot_products()),
        embedded, cos, sin, reference_caches, slots, tables, seq_lens,
    )
    assert got.dtype == dtype and got.shape == (rows, hidden)
    # Errors relative to the largest value of each tensor. float32: float32 rounding only
    # (worst seen over 25 seeds of every case: 1.6e-5); bfloat16: matmul inputs, the K/V
    # cache and the output rounded to bf16 too, each a half-ulp flip where float32 and the
    # float64 reference land on either side of a rounding boundary (worst seen: 9.6e-3).
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2

    def assert_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
        reference = reference.double()
        torch.testing.assert_close(actual.double(), reference, rtol=0, atol=tolerance * reference.abs().max().item())

    assert_close(got, expected)
    for (key, value), (ref_key, ref_value) in zip(caches, reference_caches):
        assert_close(key, ref_key)
        assert_close(value, ref_value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 5, 8, 40])
def test_fused_decode_with_sliding_window_layers_in_their_own_kv_group(dtype: torch.dtype, window: int) -> None:
    """Layers 0 and 2 global (KV group 0), layer 1 a sliding window (group 1, its own slots and
    tables). In the windowed layer every slot before a row's window is NaN and the table
    entries of blocks wholly before it point at a NaN block, as the scheduler leaves freed
    blocks: reading any of them turns the output NaN. Windows 1, inside a block, on a block
    boundary (blocks of 4 and 8) and beyond every context."""
    hidden, heads, kv_heads, head_dim, inter, block_size, rows = 128, 4, 2, 32, 256, 4, 5
    generator = torch.Generator().manual_seed(7 * window + (dtype == torch.bfloat16))
    layers, reference_layers = [], []
    for _ in range(3):
        qkv, qkv64 = random_q4((heads + 2 * kv_heads) * head_dim, hidden, generator)
        o, o64 = random_q4(hidden, heads * head_dim, generator)
        gate_up, gate_up64 = random_q4(2 * inter, hidden, generator)
        down, down64 = random_q4(hidden, inter, generator)
        norms = [(1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype) for _ in range(2)]
        layers.append(LayerWeights(norms[0], qkv, o, norms[1], gate_up, down))
        reference_layers.append(dict(input_norm=norms[0].double(), post_norm=norms[1].double(), qkv=qkv64, o=o64,
                                     gate_up=gate_up64, down=down64))
    final_norm = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype)
    windows, kv_groups = [None, window, None], [0, 1, 0]
    decoder = FusedDecoder(layers, final_norm, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, eps=1e-5,
                           dtype=dtype, sliding_windows=windows, kv_groups=kv_groups)

    num_blocks = 100  # block 0: the NaN stand-in for freed blocks
    seq_lens = torch.tensor([1, 9, 16, 23, 33], dtype=torch.int32)
    max_blocks = int((seq_lens.max() + block_size - 1) // block_size)
    tables = (torch.randperm(num_blocks - 1, generator=generator)[: 2 * rows * max_blocks] + 1)
    tables = tables.reshape(2, rows, max_blocks).to(torch.int32)
    caches = [tuple(torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
                    for _ in range(2)) for _ in range(3)]
    for cache in caches[1]:
        cache[0] = float("nan")
        for t, n in enumerate(seq_lens.tolist()):
            for position in range(max(0, n - window)):
                cache[tables[1, t, position // block_size], position % block_size] = float("nan")
    for t, n in enumerate(seq_lens.tolist()):
        tables[1, t, : max(0, n - window) // block_size] = 0
    slots = torch.tensor([[int(tables[g, t, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                           for t, n in enumerate(seq_lens.tolist())] for g in range(2)], dtype=torch.int64)
    reference_caches = [tuple(c.clone() for c in pair) for pair in caches]
    embedded = torch.randn(rows, hidden, generator=generator).to(dtype)
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    got = decoder(embedded, cos, sin, caches, slots, tables, seq_lens)
    expected = reference_step(
        dict(layers=reference_layers, final_norm=final_norm.double(), heads=heads, kv_heads=kv_heads,
             head_dim=head_dim, eps=1e-5, round_inputs=dtype == torch.bfloat16 and bf16_dot_products(),
             windows=windows, kv_groups=kv_groups),
        embedded, cos, sin, reference_caches, slots, tables, seq_lens,
    )
    assert not got.isnan().any()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance * expected.abs().max().item())
    with pytest.raises(ValueError, match="in each of 2 KV groups"):  # one group's metadata for a two-group model
        decoder(embedded, cos, sin, caches, slots[0], tables[0], seq_lens)


def test_a_slot_past_the_cache_is_refused_before_anything_is_written() -> None:
    generator = torch.Generator().manual_seed(0)
    qkv, _ = random_q4(128, 64, generator)
    o, _ = random_q4(64, 64, generator)
    gate_up, _ = random_q4(128, 64, generator)
    down, _ = random_q4(64, 64, generator)
    norm = torch.ones(64)
    decoder = FusedDecoder([LayerWeights(norm, qkv, o, norm, gate_up, down)], norm, num_heads=2, num_kv_heads=1,
                           head_dim=32, eps=1e-5, dtype=torch.float32)
    caches = [(torch.zeros(2, 4, 1, 32), torch.zeros(2, 4, 1, 32))]
    with pytest.raises(IndexError, match="past the KV cache"):
        decoder(torch.randn(1, 64), torch.ones(1, 16), torch.zeros(1, 16), caches, torch.tensor([8]),
                torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
    assert all(not c.any() for pair in caches for c in pair)
    with pytest.raises(ValueError, match="model dtype"):  # bf16 embeddings for a float32 model
        decoder(torch.randn(1, 64).to(torch.bfloat16), torch.ones(1, 16), torch.zeros(1, 16), caches,
                torch.tensor([0]), torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))


def test_what_the_fused_step_cannot_run_is_said() -> None:
    generator = torch.Generator().manual_seed(1)
    whole, _ = random_q4(128, 64, generator)
    partial, _ = random_q4(96, 64, generator)
    cpu = torch.device("cpu")
    assert unavailable_reason(torch.bfloat16, [whole], cpu) is None
    assert "blocks of 64 rows" in unavailable_reason(torch.float32, [whole, partial], cpu)
    assert "float64" in unavailable_reason(torch.float64, [whole], cpu)
    assert "CPU only" in unavailable_reason(torch.float32, [whole], torch.device("meta"))
