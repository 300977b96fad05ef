"""Greedy output of the whole engine equals HF transformers' `generate`, token for token.

Both run in float64 so fp32 near-ties cannot flip an argmax (see NOTES: exactness).
The engine runs all eight prompts together, under four memory/budget regimes: roomy,
chunked prefill, preemption by recompute and preemption by swap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.engine.conftest import RANDOM_LLAMA_PROMPTS
from tests.engine.hf_reference import NUM_NEW_TOKENS

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0)


def run_engine(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    completions = engine.generate(prompts, GREEDY)
    assert engine.scheduler.block_pool.num_free_blocks == engine.scheduler.block_pool.num_blocks
    return [c.token_ids for c in completions]


CHUNK_BUDGET = 32


def test_prompts_exercise_chunking(smollm2_prompts: list[list[int]]) -> None:
    """Lengths from under one block to several chunks of the chunked-prefill regime."""
    lengths = sorted(len(p) for p in smollm2_prompts)
    assert lengths[0] < 16 and lengths[-1] > 2 * CHUNK_BUDGET, lengths


@pytest.mark.parametrize(
    "regime, overrides",
    [
        ("roomy", dict(limits=SchedulingLimits(max_num_batched_tokens=2048))),
        ("chunked-prefill", dict(limits=SchedulingLimits(max_num_batched_tokens=CHUNK_BUDGET))),
        ("preempting", dict(num_kv_blocks=22, limits=SchedulingLimits(max_num_batched_tokens=96))),
        # Preemption by swap changes where K/V wait, never what is generated: victims'
        # blocks go to a swap pool (64 MiB: ~45 float64 blocks, room for every victim).
        ("swapping", dict(
            num_kv_blocks=22, swap_space_bytes=64 << 20,
            limits=SchedulingLimits(max_num_batched_tokens=96, preemption_mode="swap"),
        )),
    ],
)
def test_smollm2_matches_hf(
    regime: str, overrides: dict, smollm2_prompts: list[list[int]], smollm2_reference: list[list[int]]
) -> None:
    engine = LLMEngine(EngineConfig(dtype="float64", **overrides))
    outputs = run_engine(engine, smollm2_prompts)
    if regime == "preempting":
        assert engine.scheduler.num_preemptions_total > 0 and engine.scheduler.num_swap_outs_total == 0
    if regime == "swapping":
        assert engine.runner.num_swap_blocks > 0 and engine.scheduler.num_swap_outs_total > 0
        assert engine.scheduler.num_swap_ins_total == engine.scheduler.num_swap_outs_total
        assert engine.scheduler.swap_pool.num_free_blocks == engine.scheduler.swap_pool.num_blocks
    for prompt, ours, ref in zip(smollm2_prompts, outputs, smollm2_reference):
        assert ours == ref, f"prompt of {len(prompt)} tokens diverged"


def test_random_gqa_llama_folder_matches_hf(random_llama_dir: Path, random_llama_reference: list[list[int]]) -> None:
    prompts, reference = RANDOM_LLAMA_PROMPTS, random_llama_reference
    engine = LLMEngine(EngineConfig(
        model=str(random_llama_dir), dtype="float64", num_kv_blocks=40, limits=SchedulingLimits(max_num_batched_tokens=64)
    ))
    outputs = run_engine(engine, prompts)
    assert engine.scheduler.num_preemptions_total > 0
    for ours, ref in zip(outputs, reference):
        assert ours == ref
