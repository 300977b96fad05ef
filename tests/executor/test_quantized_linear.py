"""Tests for `services/executor/quantized_linear.py` and the GGUF loading around it, on the
embedded SmolLM2 GGUF itself: every 4-bit tensor decodes to exactly the weights `gguf`
dequantizes, every projection's int4 matmul equals the fp32 one within bf16 tolerance, the
other tensor types load dense and exact, and a tensor-parallel rank's slice of the packed
weights is the slice of the dense ones."""

from __future__ import annotations

import itertools
import os
import sys
from collections import Counter

import gguf
import numpy as np
import pytest
import torch

from pagedserve.kernels import q8_matmul
from pagedserve.services.executor.model_config import load_model_config
from pagedserve.services.executor.quantized_linear import Int4Linear, Int4Weight, Int8Linear, int4_max_rows
from pagedserve.services.executor.step_paths import StepPaths
from pagedserve.services.executor.tensor_parallel import ShardPlan
from pagedserve.services.executor.weight_loader import gguf_name_to_hf, iter_gguf_weights

PATHS = StepPaths()
INT8_LM_HEAD_MAX_ROWS = PATHS.int8_lm_head_max_rows
from pagedserve.shared.model_source import default_model_source

SOURCE = default_model_source()
assert SOURCE.gguf_file is not None
GGUF_PATH = os.path.join(SOURCE.directory, SOURCE.gguf_file)
BF16_TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}  # relative to the output's scale, see _assert_close_bf16


def _assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 activations carry 8 significant bits: errors are relative to the row's size."""
    scale = expected.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(actual / scale, expected / scale, **BF16_TOLERANCE)


@pytest.fixture(scope="module")
def model_config():  # type: ignore[no-untyped-def]
    return load_model_config(SOURCE)


@pytest.fixture(scope="module")
def dense_weights(model_config) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return dict(iter_gguf_weights(GGUF_PATH, model_config))


@pytest.fixture(scope="module")
def packed_weights(model_config) -> dict[str, torch.Tensor | Int4Weight]:  # type: ignore[no-untyped-def]
    return dict(iter_gguf_weights(GGUF_PATH, model_config, keep_int4=True))


def test_every_tensor_type_of_the_embedded_gguf_loads_as_its_dequantized_weights(
    dense_weights: dict[str, torch.Tensor], packed_weights: dict[str, torch.Tensor | Int4Weight]
) -> None:
    """Q4_1 linears stay packed and decode exactly (codes, scales and the rotary row order
    included); Q8_0 (the embedding) and F32 (norms) load dense, the same either way."""
    reader = gguf.GGUFReader(GGUF_PATH)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}  # the file this test covers
    kept = Counter()
    for tensor in reader.tensors:
        name = gguf_name_to_hf(tensor.name)
        assert name is not None
        loaded, dense = packed_weights[name], dense_weights[name]
        if tensor.tensor_type.name == "Q4_1":
            assert isinstance(loaded, Int4Weight)
            assert torch.equal(loaded.dequantize(), dense)
        else:
            assert isinstance(loaded, torch.Tensor) and torch.equal(loaded, dense)
        kept[type(loaded).__name__, tensor.tensor_type.name] += 1
    assert kept == {("Int4Weight", "Q4_1"): 210, ("Tensor", "F32"): 61, ("Tensor", "Q8_0"): 1}


@pytest.mark.parametrize("projection", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
def test_int4_linear_equals_the_fp32_linear_within_bf16_tolerance(
    projection: str, dense_weights: dict[str, torch.Tensor], packed_weights: dict[str, torch.Tensor | Int4Weight]
) -> None:
    layer = 7
    name = next(n for n in dense_weights if n.startswith(f"model.layers.{layer}.") and f".{projection}." in n)
    weight = packed_weights[name]
    assert isinstance(weight, Int4Weight)
    generator = torch.Generator().manual_seed(layer)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, weight.shape[1], generator=generator).to(dtype)
        out = Int4Linear(weight)(x)
        assert out.dtype == dtype and out.shape == (5, weight.shape[0])
        _assert_close_bf16(out.float(), x.float() @ dense_weights[name].T)
    # A strided input (the MLP hands down_proj a view of gate_up's output) works too.
    wide = torch.randn(3, 2 * weight.shape[1], generator=generator)
    _assert_close_bf16(Int4Linear(weight)(wide[:, ::2]), wide[:, ::2] @ dense_weights[name].T)


def test_q4_0_decodes_exactly_and_multiplies_within_bf16_tolerance() -> None:
    """The embedded model has no Q4_0; a tensor quantized by `gguf` itself stands in."""
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((48, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q4_0)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0))
    weight = Int4Weight.from_q4_0(blocks, 48, 96)
    assert torch.equal(weight.dequantize(), expected)
    x = torch.from_numpy(rng.standard_normal((4, 96)).astype(np.float32))
    _assert_close_bf16(Int4Linear(weight)(x), x @ expected.T)


def test_a_tensor_parallel_rank_gets_the_slice_of_the_packed_weights(model_config) -> None:  # type: ignore[no-untyped-def]
    """Rank 1 of 3: column-parallel q/k/v/gate/up by rows, row-parallel o/down by columns
    (192 and 512 of them: whole groups of 32), decoded equal to the dense slices."""
    plan = ShardPlan.for_model(model_config, rank=1, world_size=3)
    # The file holds the embedding, then layer 0's nine tensors: read no further.
    layer0 = lambda items: {n: t for n, t in itertools.islice(items, 10) if n.startswith("model.layers.0.")}  # noqa: E731
    dense = layer0(iter_gguf_weights(GGUF_PATH, model_config, plan))
    packed = layer0(iter_gguf_weights(GGUF_PATH, model_config, plan, keep_int4=True))
    assert len(dense) == 9 and dense.keys() == packed.keys()
    sliced = 0
    for name, tensor in dense.items():
        weight = packed[name]
        if isinstance(weight, Int4Weight):
            assert torch.equal(weight.dequantize(), tensor), name
            sliced += plan.slice_of(name) is not None
    assert sliced == 7


def test_a_column_slice_must_hold_whole_groups() -> None:
    weight = Int4Weight(np.zeros((16, 64), np.uint8), np.ones((16, 2), np.float32), np.zeros((16, 2), np.float32))
    assert weight.take_cols(32, 32).shape == (16, 32)
    with pytest.raises(ValueError, match="groups of 32 columns.*16..48.*--weight-format dequantized"):
        weight.take_cols(16, 32)


def test_auto_keeps_dense_weights_for_steps_of_many_rows(packed_weights: dict[str, torch.Tensor | Int4Weight]) -> None:
    weight = packed_weights["model.layers.3.mlp.down_proj.weight"]
    assert isinstance(weight, Int4Weight)
    dense = weight.dequantize().to(torch.bfloat16)
    hybrid, packed_only = Int4Linear(weight, dense=dense, max_rows=4), Int4Linear(weight)
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert torch.equal(hybrid(x), torch.nn.functional.linear(x, dense))  # 5 rows: the dense GEMM
    assert torch.equal(hybrid(x[:4]), packed_only(x[:4]))  # 4 rows: the int4 kernel


def test_int8_lm_head_is_the_group_requantized_head_within_bf16_tolerance(dense_weights: dict[str, torch.Tensor]) -> None:
    """The embedded model's head (tied to its Q8_0 embedding table), requantized with one
    scale per 32 columns: every weight within half a step of the dense one (a step of 1/127
    of its group's largest weight), the product within bf16 tolerance of the requantized
    weight's own fp64 product for steps of up to INT8_LM_HEAD_MAX_ROWS rows, and the dense
    GEMM itself above. The dense weight is the same tensor, not a copy. (Greedy agreement
    with the dense model: test_quantized_engine.)"""
    weight = dense_weights["model.embed_tokens.weight"]
    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        dense = weight.to(dtype)
        head = Int8Linear(dense, INT8_LM_HEAD_MAX_ROWS)
        assert head.dense.data_ptr() == dense.data_ptr() and head.codes.dtype == torch.int8
        requantized = q8_matmul.dequantize(head.codes, head.scales)
        step = head.scales.transpose(1, 2).reshape(weight.shape[0], -1).repeat_interleave(q8_matmul.GROUP, dim=1)
        assert bool(((requantized - dense.float()).abs() <= step * (0.5 + 1e-6) + 1e-12).all())
        for rows in (1, 3, INT8_LM_HEAD_MAX_ROWS):
            x = torch.randn(rows, weight.shape[1], generator=generator).to(dtype)
            out = head(x)
            assert out.dtype == dtype and out.shape == (rows, weight.shape[0])
            _assert_close_bf16(out.float(), (x.double() @ requantized.double().T).float())
        x = torch.randn(INT8_LM_HEAD_MAX_ROWS + 1, weight.shape[1], generator=generator).to(dtype)
        assert torch.equal(head(x), torch.nn.functional.linear(x, dense))


def test_weight_format_resolution() -> None:
    """auto packs 4-bit weights for small steps on CPU in bf16/fp32 (dense beside them for
    the rest); quantized packs them for every step; float64 (the exactness tests) always
    expands them, and asking for quantized there is refused with the reason."""
    cpu = torch.device("cpu")
    assert int4_max_rows("auto", torch.bfloat16, cpu, True, PATHS)[0] == PATHS.int4_max_rows_bfloat16
    assert int4_max_rows("auto", torch.float32, cpu, True, PATHS)[0] == PATHS.int4_max_rows_float32
    assert int4_max_rows("quantized", torch.bfloat16, cpu, True, PATHS)[0] == sys.maxsize
    assert int4_max_rows("auto", torch.float64, cpu, True, PATHS)[0] == 0
    assert int4_max_rows("quantized", torch.float32, cpu, False, PATHS)[0] == 0  # not a GGUF
    assert int4_max_rows("dequantized", torch.bfloat16, cpu, True, PATHS)[0] == 0
    with pytest.raises(ValueError, match="float64.*--weight-format dequantized"):
        int4_max_rows("quantized", torch.float64, cpu, True, PATHS)
    with pytest.raises(ValueError, match="CPU only"):
        int4_max_rows("quantized", torch.bfloat16, torch.device("meta"), True, PATHS)
