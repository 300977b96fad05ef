"""The step-path cut-offs (services/executor/step_paths.py): one table, overridable by
PAGEDSERVE_STEP_PATHS, and the override reaches each path it cuts off (the int4 matmuls,
the int8 LM head, the fused C decode step) in a real model runner."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import q8_matmul
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.model_runner import ModelRunner
from pagedserve.services.executor.quantized_linear import Int8Linear, int4_max_rows
from pagedserve.services.executor.step_paths import ENV_VAR, StepPaths
from pagedserve.shared.model_source import default_model_source


def test_the_environment_overrides_named_cut_offs_only() -> None:
    assert StepPaths.from_env({}) == StepPaths() == StepPaths.from_env({ENV_VAR: " "})
    paths = StepPaths.from_env({ENV_VAR: "fused_decode_max_rows=16, int8_lm_head_max_rows=0"})
    assert paths == StepPaths(fused_decode_max_rows=16, int8_lm_head_max_rows=0)
    assert paths.int4_max_rows_bfloat16 == StepPaths().int4_max_rows_bfloat16  # the rest keep their defaults


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("fused_rows=4", "unknown cut-off 'fused_rows' \\(known: fused_decode_max_rows, "),
        ("int8_lm_head_max_rows=eight", "int8_lm_head_max_rows needs a whole number of rows, got 'eight'"),
        ("int4_max_rows_float32=-1", "int4_max_rows_float32 must be >= 0"),
    ],
)
def test_a_bad_override_is_refused_naming_it(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        StepPaths.from_env({ENV_VAR: value})


def test_int4_cut_off_per_dtype() -> None:
    paths = StepPaths(int4_max_rows_bfloat16=3, int4_max_rows_float32=5)
    cpu = torch.device("cpu")
    assert int4_max_rows("auto", torch.bfloat16, cpu, True, paths)[0] == 3
    assert int4_max_rows("auto", torch.float32, cpu, True, paths)[0] == 5
    assert paths.int4_max_rows(torch.float64) is None and int4_max_rows("auto", torch.float64, cpu, True, paths)[0] == 0


def test_the_int8_head_takes_its_cut_off() -> None:
    """At most `max_rows` rows go through the int8 kernel (not the dense product); more
    rows take the dense GEMM, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(2 * q8_matmul.BLOCK, 2 * q8_matmul.GROUP, generator=generator)
    head = Int8Linear(dense, max_rows=2)
    small, large = torch.randn(2, dense.shape[1], generator=generator), torch.randn(3, dense.shape[1], generator=generator)
    requantized = q8_matmul.dequantize(head.codes, head.scales)
    assert torch.allclose(head(small), small @ requantized.T, rtol=1e-4, atol=1e-4)
    assert not torch.equal(head(small), torch.nn.functional.linear(small, dense))
    assert torch.equal(head(large), torch.nn.functional.linear(large, dense))


@pytest.mark.slow
def test_the_runner_reads_the_table_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "fused_decode_max_rows=3,int4_max_rows_float32=5,int8_lm_head_max_rows=2")
    runner = ModelRunner(
        EngineConfig(dtype="float32", weight_format="auto", kv_cache_memory_bytes=8 << 20), default_model_source()
    )
    assert runner.step_paths == StepPaths(fused_decode_max_rows=3, int4_max_rows_float32=5, int8_lm_head_max_rows=2)
    assert runner.int4_max_rows == 5
    projection = runner.model.layers[0].mlp.down_proj
    assert projection.max_rows == 5  # an Int4Linear: packed up to 5 rows, dense above
    assert isinstance(runner.model.lm_head, Int8Linear) and runner.model.lm_head.max_rows == 2
    assert runner.model.fused_decoder is not None and runner.model.fused_max_rows == 3
