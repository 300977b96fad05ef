"""Parallel sampling on the whole engine and the embedded SmolLM2: a request with `n`
samples computes its prompt once and forks; its samples equal the same seeds run as
separate requests (sample i uses seed + i), greedy samples are identical, and the forked
samples hold fewer blocks than separate requests do.

float64, as in the exactness test: the forked samples run in other batches than the
separate requests (and the copied block's K/V come from the prompt's step), which may
change float32 rounding and so flip a near-tie; in float64 any difference is a real bug.
"""

from __future__ import annotations

import pytest

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16
PROMPT = (
    "Write three different opening lines for a mystery novel set in a lighthouse on the coast of "
    "Brittany during a winter storm, where the keeper has just found a letter addressed to"
)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    # No prefix caching: separate requests would share their prompt's full blocks through
    # it, which would blur the block count comparison. A small budget chunks the prompt.
    return LLMEngine(
        EngineConfig(
            dtype="float64", block_size=BLOCK_SIZE,
            limits=SchedulingLimits(max_num_batched_tokens=32, enable_prefix_caching=False),
        )
    )


def peak_blocks_and_outputs(
    engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[int, dict[tuple[int, int], list[int]]]:
    """The most blocks in use after any step, and the tokens of each (prompt, sample)."""
    outputs: dict[tuple[int, int], list[int]] = {}
    peak = 0
    for index, delta in engine.stream(prompts, params):
        outputs.setdefault((index, delta.sample_index), []).extend(delta.new_token_ids)
        peak = max(peak, engine.scheduler.block_pool.num_used_blocks)
    assert engine.scheduler.block_pool.num_used_blocks == 0
    return peak, outputs


def test_seeded_samples_equal_separate_requests_and_use_fewer_blocks(engine: LLMEngine) -> None:
    prompt = engine.tokenize(PROMPT)
    assert len(prompt) > 32 and len(prompt) % BLOCK_SIZE != 0  # chunked; copy-on-write
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=2024, n=4, ignore_eos=True)
    forked_peak, forked = peak_blocks_and_outputs(engine, [prompt], [params])
    separate_peak, separate = peak_blocks_and_outputs(engine, [prompt] * 4, [params.for_sample(i) for i in range(4)])
    assert [forked[(0, i)] for i in range(4)] == [separate[(i, 0)] for i in range(4)]
    assert all(len(tokens) == 12 for tokens in forked.values())
    assert len({tuple(tokens) for tokens in forked.values()}) > 1  # the seeds differ
    # Separate: 4 x the prompt's blocks; forked: its full blocks once.
    num_full_prompt_blocks = len(prompt) // BLOCK_SIZE
    assert forked_peak <= separate_peak - 3 * num_full_prompt_blocks


def test_greedy_samples_are_identical_and_generate_returns_n_outputs(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0, n=2, ignore_eos=True)
    completions = engine.generate([PROMPT, "The capital of France is"], params)
    single = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    for completion in completions:
        assert [o.index for o in completion.outputs] == [0, 1]
        assert completion.outputs[0].token_ids == completion.outputs[1].token_ids
        assert completion.outputs[1].text == completion.text
        assert all(o.finish_reason == "length" for o in completion.outputs)
    assert completions[0].token_ids == single.token_ids and len(single.outputs) == 1
