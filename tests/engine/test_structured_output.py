"""Structured output in the engine (scheduler core + model runner, the embedded SmolLM2):
every sample of a grammar-constrained request matches its grammar, with parallel samples
forked from one prompt (n > 1), and with preemption by recompute and by swap, where each
preempted sequence's matcher is rebuilt from the tokens it had generated.

Sampled at temperature 1.0, where an unconstrained 135M model almost never writes valid
JSON for a schema: only the mask can make every one of these valid.
"""

from __future__ import annotations

import json
import re

import pytest

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.structured_output import GrammarSpec

pytestmark = pytest.mark.slow

# Bounded strings and numbers, so a complete object always fits in MAX_TOKENS.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "member", "color"],
    "additionalProperties": False,
}
MAX_TOKENS = 48
# Two chat prompts (~40 tokens each) and four samples growing by ~25-40 tokens each need
# more than 10 blocks of 16 at once: the pool must preempt (asserted).
SMALL_POOL = dict(num_kv_blocks=10, limits=SchedulingLimits(max_num_batched_tokens=96))


def valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"name", "age", "member", "color"}
        and isinstance(value["name"], str) and len(value["name"]) <= 6
        and isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 120
        and isinstance(value["member"], bool)
        and value["color"] in ("red", "green", "blue")
    )


def constrained(seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(
        max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, n=n,
        structured_output=GrammarSpec("json_schema", json.dumps(SCHEMA)),
    )


@pytest.fixture(scope="module")
def small_pool_engine() -> LLMEngine:
    """One engine (preemption by recompute) for both tests: a model load less."""
    return LLMEngine(EngineConfig(**SMALL_POOL))


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_parallel_samples_and_preemption_stay_valid(
    smollm2_prompts: list[list[int]], small_pool_engine: LLMEngine, preemption_mode: str
) -> None:
    # n = 2 samples forked from each of two short chat prompts (~40 tokens), in a pool
    # that must preempt.
    prompts = [smollm2_prompts[i] for i in (4, 6)]
    if preemption_mode == "swap":
        engine = LLMEngine(EngineConfig(
            num_kv_blocks=10, swap_space_bytes=64 << 20,
            limits=SchedulingLimits(max_num_batched_tokens=96, preemption_mode="swap"),
        ))
    else:
        engine = small_pool_engine
    structured = engine.runner.structured_output
    preemptions, compiles = engine.scheduler.num_preemptions_total, structured.compiler.num_compiles
    completions = engine.generate(prompts, [constrained(100 + i, n=2) for i in range(len(prompts))])
    texts = [output.text for completion in completions for output in completion.outputs]
    assert len(texts) == 2 * len(prompts)
    assert [t for t in texts if not valid(t)] == []
    assert all(output.finish_reason == "stop" for c in completions for output in c.outputs)
    assert engine.scheduler.num_preemptions_total > preemptions
    if preemption_mode == "swap":
        assert engine.scheduler.num_swap_outs_total > 0
    # Samples of one prompt differ (each its own seed): the fork did not share a matcher.
    assert any(len({o.text for o in c.outputs}) > 1 for c in completions)
    assert structured.compiler.num_compiles <= compiles + 1  # one schema, compiled once
    assert structured.num_dead_ends == 0


def test_regex_choice_and_grammar_mixed_with_free_rows_in_one_batch(small_pool_engine: LLMEngine) -> None:
    engine = small_pool_engine
    prompt = "<|im_start|>user\nAnswer.<|im_end|>\n<|im_start|>assistant\n"
    specs = [
        GrammarSpec("regex", r"[0-9]{3}-[0-9]{4}"),
        GrammarSpec("choice", json.dumps(["yes", "no", "it \"depends\""])),
        GrammarSpec("grammar", 'root ::= "(" [a-z] [a-z]? [a-z]? [a-z]? ")"'),  # fits max_tokens
        None,  # an unconstrained row in the same batches
    ]
    params = [
        SamplingParams(max_tokens=16, temperature=1.0, seed=7, structured_output=spec)
        if spec is not None else SamplingParams(max_tokens=16, temperature=1.0, seed=7)
        for spec in specs
    ]
    regex, choice, grammar, free = engine.generate([prompt] * 4, params)
    assert all(re.fullmatch(r"[0-9]{3}-[0-9]{4}", o.text) for o in regex.outputs), [o.text for o in regex.outputs]
    assert all(o.text in ("yes", "no", 'it "depends"') for o in choice.outputs), [o.text for o in choice.outputs]
    assert all(re.fullmatch(r"\([a-z]{1,4}\)", o.text) for o in grammar.outputs), [o.text for o in grammar.outputs]
    # The free row was not masked: free text, not one of the constrained shapes.
    assert not any(o.text in ("yes", "no") or re.fullmatch(r"[0-9]{3}-[0-9]{4}", o.text) for o in free.outputs)
