"""Asynchronous scheduling (the scheduler service's default) gives exactly the tokens of
the synchronous order, on the real model in float64.

The service schedules step n+1 while the executor runs step n; here the same scheduler
core and model runner are driven in that order by plain calls (`generate_ahead`), with the
widest gap the service allows: the runner runs each step before the core has the result
of the one before. (The synchronous order equals HF's greedy output in float64:
test_llm_engine_exactness.py.) One mixed batch: greedy, seeded sampling, n = 2, a stop token, chunked
prefill, prefix-cache hits (the second run meets the first one's blocks) and preemption (a
pool too small for all of them). Structured output (whose masks take float32 logits) has
a test of its own: a constrained request runs once past its grammar's end.
"""

from __future__ import annotations

import json
import re
from collections import deque

import pytest

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.messages import ExecuteStep, StepResult
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.structured_output import GrammarSpec

pytestmark = pytest.mark.slow

MAX_TOKENS = 16


def mixed_params(stop_token: int) -> list[SamplingParams]:
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return [
        greedy,
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=7),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=11, n=2),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=[stop_token]),  # stops early
        SamplingParams(max_tokens=MAX_TOKENS // 2, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=MAX_TOKENS - 3, temperature=0.5, seed=5),
    ]


def generate_ahead(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[dict[tuple[int, int], list[int]], int]:
    """Each prompt's samples' tokens, by (prompt index, sample index), and how many steps
    were scheduled while another was in flight."""
    scheduler, runner = engine.scheduler, engine.runner
    index_of = {engine.add_request(prompt, p): i for i, (prompt, p) in enumerate(zip(prompts, params))}
    outputs: dict[tuple[int, int], list[int]] = {}
    finished: set[tuple[int, int]] = set()
    in_flight: deque[tuple[ExecuteStep, StepResult]] = deque()
    num_ahead = 0
    while scheduler.has_unfinished_requests() or in_flight:
        while len(in_flight) < 2 and scheduler.has_unfinished_requests() and (not in_flight or scheduler.can_schedule_ahead()):
            num_ahead += bool(in_flight)
            step = scheduler.schedule()
            in_flight.append((step, runner.execute(step)))
        step, result = in_flight.popleft()
        for delta in scheduler.update_from_output(step, result):
            key = (index_of[delta.request_id], delta.sample_index)
            assert key not in finished, f"a token for {key} after it finished"  # surplus tokens are dropped
            outputs.setdefault(key, []).extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                finished.add(key)
    runner.execute(scheduler.schedule())  # the last finished ids reach the runner
    assert runner.requests == {}
    return outputs, num_ahead


def test_async_scheduling_equals_the_synchronous_order(smollm2_prompts: list[list[int]]) -> None:
    # The longest prompt (~130 tokens) plus its output needs 10 of the 11 blocks: the
    # others preempt it and each other.
    engine = LLMEngine(EngineConfig(dtype="float64", num_kv_blocks=11, limits=SchedulingLimits(max_num_batched_tokens=64)))
    prompts = smollm2_prompts[:6]
    params = mixed_params(stop_token=engine.tokenizer.convert_tokens_to_ids(","))
    completions = engine.generate(prompts, params)
    synchronous = {(i, o.index): o.token_ids for i, c in enumerate(completions) for o in c.outputs}
    assert completions[3].finish_reason == "stop" and len(completions[3].token_ids) < MAX_TOKENS
    assert engine.scheduler.num_preemptions_total > 0
    asynchronous, num_ahead = generate_ahead(engine, prompts, params)
    assert num_ahead > 20  # most steps went ahead
    assert engine.scheduler.prefix_cache_stats.num_hits > 0
    assert asynchronous == synchronous
    assert synchronous[(2, 0)] != synchronous[(2, 1)]
    pool = engine.scheduler.block_pool
    assert pool.num_free_blocks == pool.num_blocks


def test_structured_output_runs_ahead_and_survives_its_surplus_step() -> None:
    """A constrained request that ends (its grammar accepts EOS) is in the step scheduled
    ahead of that result: the executor must run it once more past its grammar's end (a
    terminated matcher has no mask) and the scheduler drop that token. float32: the
    grammar masks take float32 logits."""
    engine = LLMEngine(EngineConfig(kv_cache_memory_bytes=64 << 20))
    prompt = engine.tokenize("<|im_start|>user\nAnswer.<|im_end|>\n<|im_start|>assistant\n")
    choice = GrammarSpec("choice", json.dumps(["yes", "no"]))
    regex = GrammarSpec("regex", r"[0-9]{3}-[0-9]{4}")
    params = [
        SamplingParams(max_tokens=16, temperature=1.0, seed=1, structured_output=choice),  # ends first
        SamplingParams(max_tokens=16, temperature=1.0, seed=2, structured_output=regex),
        SamplingParams(max_tokens=16, temperature=1.0, seed=3),  # free text, goes on
    ]
    outputs, num_ahead = generate_ahead(engine, [prompt] * 3, params)
    assert num_ahead > 5
    texts = [engine.tokenizer.decode(outputs[(i, 0)], skip_special_tokens=True) for i in range(3)]
    assert texts[0] in ("yes", "no") and re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[1]), texts
    assert outputs[(0, 0)][-1] == engine.eos_token_id  # the last token streamed is its EOS, no surplus after it
    assert engine.runner.structured_output.num_dead_ends == 0
