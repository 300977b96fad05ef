"""The whole engine with the Triton kernels produces the same greedy tokens as without
them, on a small random GQA Llama: on CPU, Triton's interpreter against the CPU kernels;
on a GPU, the compiled kernels against the torch ops on the same GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

pytestmark = pytest.mark.slow


def test_triton_engine_matches_torch_engine(random_llama_dir: Path) -> None:
    prompts = [[1, 400, 401, 402], [1] + list(range(500, 540)), [1] + list(range(900, 917))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for use_triton in (False, True):
        engine = LLMEngine(
            EngineConfig(
                model=str(random_llama_dir), dtype="float32", use_triton=use_triton, num_kv_blocks=32,
                limits=SchedulingLimits(max_num_batched_tokens=24),
            )
        )
        plain = "torch_ops" if torch.cuda.is_available() else "cpu_ops"
        assert engine.runner.kernels.__name__.endswith("triton_ops" if use_triton else plain)
        outputs[use_triton] = [c.token_ids for c in engine.generate(prompts, params)]
    assert outputs[True] == outputs[False]
    assert all(len(tokens) == params.max_tokens for tokens in outputs[True])
