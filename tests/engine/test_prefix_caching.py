"""Prefix caching changes what is computed, never what is generated: the whole engine on
the embedded SmolLM2 gives the same greedy and seeded-sampling tokens with it on and off,
while reusing the K/V of shared prompt prefixes.

float64, as in the exactness test: a hit moves chunk boundaries (the cached K/V were
computed in another request's batch), which may change float32 rounding and so flip a
near-tie; in float64 any difference would be a real bug.
"""

from __future__ import annotations

import pytest

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are a careful assistant for a small hardware shop in Lyon. Answer in one short "
    "sentence, quote prices in euros, never invent stock levels or opening hours, and say "
    "so plainly when you do not know the answer to a question. Customer question:"
)
QUESTIONS = [
    " I need to hang a heavy mirror on a brick wall this weekend: which hammer and which plugs do you sell?",
    " What does your cheapest cordless drill cost, and does it come with a battery and a charger included?",
    " Are you open on Sunday mornings before the market, or only on weekdays and on Saturday afternoons?",
    " Can I return a box of screws that I opened but did not use, if I still have the receipt from May?",
]
MORE_QUESTIONS = [" Do you deliver to Paris?", " Is the saw in stock?"]
BLOCK_SIZE = 16
MAX_TOKENS = 12


def params_for(index: int) -> SamplingParams:
    """Even prompts greedy, odd ones seeded sampling (both must be reproducible)."""
    if index % 2 == 0:
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=1000 + index, ignore_eos=True)


def run(enable_prefix_caching: bool) -> tuple[list[list[list[int]]], list[int], LLMEngine, list[list[int]]]:
    """Two batches through one engine: (outputs per batch, hit tokens per batch, the
    engine, the first batch's prompts)."""
    # A chunked-prefill budget staggers admissions, so later prompts of the first batch
    # can already hit blocks their predecessors cached.
    engine = LLMEngine(
        EngineConfig(
            dtype="float64", block_size=BLOCK_SIZE,
            limits=SchedulingLimits(max_num_batched_tokens=64, enable_prefix_caching=enable_prefix_caching),
        )
    )
    system = engine.tokenize(SYSTEM)
    first = [system + engine.tokenize(q) for q in QUESTIONS]
    # The second batch repeats the first (a retry, another sample) and adds new questions.
    second = first + [system + engine.tokenize(q) for q in MORE_QUESTIONS]
    outputs, hit_tokens = [], []
    stats = engine.scheduler.prefix_cache_stats
    for batch in (first, second):
        hits_before = stats.num_hit_tokens
        completions = engine.generate(batch, [params_for(i) for i in range(len(batch))])
        outputs.append([c.token_ids for c in completions])
        hit_tokens.append(stats.num_hit_tokens - hits_before)
        pool = engine.scheduler.block_pool
        assert pool.num_used_blocks == 0 and pool.num_free_blocks == pool.num_blocks
    return outputs, hit_tokens, engine, first


def test_outputs_equal_with_and_without_prefix_caching() -> None:
    outputs_off, hits_off, engine_off, prompts = run(enable_prefix_caching=False)
    assert hits_off == [0, 0] and engine_off.scheduler.block_pool.num_cached_blocks == 0
    del engine_off

    outputs_on, hits_on, engine_on, _ = run(enable_prefix_caching=True)
    system_len = len(engine_on.tokenize(SYSTEM))
    assert system_len >= 3 * BLOCK_SIZE  # a long shared prefix: three full blocks
    shared = system_len // BLOCK_SIZE * BLOCK_SIZE
    assert hits_on[0] >= shared  # at least one later prompt of the first batch
    # The second batch: each repeat reuses its whole cached prompt but the last token's
    # block (at least one token is computed), each new question the system prompt.
    repeat_hits = sum((len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for p in prompts)
    assert hits_on[1] >= repeat_hits + len(MORE_QUESTIONS) * shared
    assert engine_on.scheduler.block_pool.num_cached_blocks > 0

    assert outputs_on == outputs_off
    assert all(len(tokens) == MAX_TOKENS for batch in outputs_on for tokens in batch)
    # The repeats equal their first run, greedy and seeded alike (same seed, same prompt).
    assert outputs_on[1][: len(QUESTIONS)] == outputs_on[0]
