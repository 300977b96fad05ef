"""Preemption by swap changes where K/V wait, never what is generated: the whole engine on
the embedded SmolLM2 gives the same greedy and seeded-sampling tokens with preemption by
swap, by recompute, and with a pool roomy enough for no preemption at all.

float64, as in the exactness test: recompute computes the K/V again in other batches,
which may change float32 rounding and flip a near-tie; in float64 any difference would be
a real bug. (Swap itself copies K/V bit for bit.)
"""

from __future__ import annotations

import pytest

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

pytestmark = pytest.mark.slow

# The preempting regime of the exactness test: 22 blocks of 16 tokens for eight prompts
# of 5 to ~130 tokens that each grow by NUM_NEW_TOKENS.
SMALL_POOL = dict(num_kv_blocks=22, limits=SchedulingLimits(max_num_batched_tokens=96))
SWAP_SPACE_BYTES = 64 << 20  # ~45 blocks of SmolLM2 in float64: room for every victim
# Fewer new tokens than the exactness test (three float64 engines run here); the prompts
# plus 32 tokens each still need ~38 blocks, so the 22-block pool must preempt (asserted).
NUM_NEW_TOKENS = 32


def params_for(index: int) -> SamplingParams:
    """Even prompts greedy, odd ones seeded sampling (both must be reproducible)."""
    if index % 2 == 0:
        return SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.8, top_p=0.95, seed=500 + index, ignore_eos=True)


def generate(config: EngineConfig, prompts: list[list[int]]) -> tuple[LLMEngine, list[list[int]]]:
    engine = LLMEngine(config)
    completions = engine.generate(prompts, [params_for(i) for i in range(len(prompts))])
    pool, swap_pool = engine.scheduler.block_pool, engine.scheduler.swap_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert swap_pool is None or swap_pool.num_free_blocks == swap_pool.num_blocks
    return engine, [c.token_ids for c in completions]


def test_swap_recompute_and_no_preemption_generate_the_same(smollm2_prompts: list[list[int]]) -> None:
    roomy, expected = generate(EngineConfig(dtype="float64"), smollm2_prompts)
    assert roomy.scheduler.num_preemptions_total == 0

    swap, swapped_outputs = generate(
        EngineConfig(
            dtype="float64", num_kv_blocks=22, swap_space_bytes=SWAP_SPACE_BYTES,
            limits=SchedulingLimits(max_num_batched_tokens=96, preemption_mode="swap"),
        ),
        smollm2_prompts,
    )
    assert swap.runner.num_swap_blocks > 0
    assert swap.scheduler.num_swap_outs_total > 0
    assert swap.scheduler.num_swap_ins_total == swap.scheduler.num_swap_outs_total
    assert swapped_outputs == expected

    recompute, recomputed_outputs = generate(EngineConfig(dtype="float64", **SMALL_POOL), smollm2_prompts)
    assert recompute.scheduler.num_preemptions_total > 0
    assert recompute.scheduler.num_swap_outs_total == 0
    assert recomputed_outputs == expected
