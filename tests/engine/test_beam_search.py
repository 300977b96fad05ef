"""Beam search on the whole engine and the embedded SmolLM2, against HF transformers'
own beam search (`generate(num_beams=...)`) on the same weights.

Several beam-search requests run together in one engine, with greedy requests beside
them, through chunked prefill and (in one test) a KV pool so small that beams are
preempted and recomputed. float64 on both sides, as in the exactness test: HF scores beams
in float32 from float64 logits and so do we, so any difference is a real bug, not
rounding. Block accounting is checked too: beams share their prompt's blocks, unpicked
beams give theirs back at once, and nothing is held at the end.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "def fibonacci(n):",
]
# (beam_width, n, length_penalty, early_stopping, max_tokens)
SETTINGS = [
    (4, 2, 1.0, False, 24),
    (3, 3, 0.5, True, 20),
    (2, 1, 2.0, "never", 16),
]


@pytest.fixture(scope="module")
def hf_model(hf_model_float64):  # type: ignore[no-untyped-def]
    return hf_model_float64  # the session's one float64 load (tests/conftest.py)


def hf_beam_search(hf_model, prompt: list[int], params: SamplingParams, eos_token_id: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """HF's best `n` beams, generated tokens only, cut after the stop token."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            num_beams=params.beam_width,
            num_return_sequences=params.n,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            max_new_tokens=params.max_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    hypotheses = []
    for row in out[:, len(prompt) :].tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        hypotheses.append(row)
    return hypotheses


def beam_params(width: int, n: int, length_penalty: float, early_stopping: bool | str, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, beam_width=width, n=n, length_penalty=length_penalty, early_stopping=early_stopping
    )


def run_and_check_blocks(engine: LLMEngine, prompts: list[str], params: list[SamplingParams]) -> list[list[list[int]]]:
    completions = engine.generate(prompts, params)
    assert engine.scheduler.block_pool.num_used_blocks == 0
    assert not engine.scheduler.has_unfinished_requests()
    return [[output.token_ids for output in completion.outputs] for completion in completions]


def test_beam_search_equals_hf(hf_model) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(EngineConfig(dtype="float64", limits=SchedulingLimits(max_num_batched_tokens=32)))
    eos = engine.eos_token_id
    assert eos is not None
    prompts = [engine.tokenize(p) for p in PROMPTS]
    params = [beam_params(*setting) for setting in SETTINGS]
    # A greedy request in the same batches: beams and samples mix in one step.
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    ours = run_and_check_blocks(engine, PROMPTS + [PROMPTS[0]], params + [greedy])
    for prompt, p, hypotheses in zip(prompts, params, ours):
        assert len(hypotheses) == p.n
        assert hypotheses == hf_beam_search(hf_model, prompt, p, eos), (p, hypotheses)
    assert len({tuple(h) for h in ours[0]}) == 2  # distinct beams, not one repeated


def test_beam_search_survives_preemption(hf_model) -> None:  # type: ignore[no-untyped-def]
    # 20 blocks of 16 tokens: three 4-beam searches cannot all hold their beams at once,
    # so whole groups are preempted and recompute every beam.
    engine = LLMEngine(
        EngineConfig(
            dtype="float64", num_kv_blocks=20, limits=SchedulingLimits(max_num_batched_tokens=64, enable_prefix_caching=False)
        )
    )
    eos = engine.eos_token_id
    assert eos is not None
    params = beam_params(4, 2, 1.0, False, 32)
    ours = run_and_check_blocks(engine, PROMPTS, [params] * 3)
    assert engine.scheduler.num_preemptions_total > 0
    for prompt, hypotheses in zip(PROMPTS, ours):
        assert hypotheses == hf_beam_search(hf_model, engine.tokenize(prompt), params, eos)


def test_unpicked_beams_free_their_blocks_at_once() -> None:
    engine = LLMEngine(EngineConfig(dtype="float32", limits=SchedulingLimits(enable_prefix_caching=False)))
    prompt = engine.tokenize(PROMPTS[1])
    request_id = engine.add_request(prompt, beam_params(4, 4, 1.0, False, 40))
    pool = engine.scheduler.block_pool
    num_prompt_blocks = -(-len(prompt) // pool.block_size)
    while engine.has_unfinished_requests():
        engine.step()
        beams = [r for r in engine.scheduler.running if r.client_request_id == request_id]
        assert len(beams) in (0, 1, 4)
        # Held blocks are exactly the union of the live beams' tables: a beam that was
        # not picked holds nothing, and shared blocks are counted once.
        held = {block for beam in beams for block in beam.block_ids}
        assert pool.num_used_blocks == len(held)
        if len(beams) == 4:
            # The prompt's full blocks are shared by all four beams.
            shared = set.intersection(*(set(beam.block_ids) for beam in beams))
            assert len(shared) >= num_prompt_blocks - 1
    assert pool.num_used_blocks == 0


def test_abort_frees_every_beam_and_reports_each_output() -> None:
    engine = LLMEngine(EngineConfig(dtype="float32"))
    request_id = engine.add_request(engine.tokenize(PROMPTS[1]), beam_params(3, 2, 1.0, False, 40))
    for _ in range(4):
        assert engine.step() == []  # nothing streams: beams change until the search ends
    assert len([r for r in engine.scheduler.running if r.client_request_id == request_id]) == 3
    deltas = engine.abort([request_id])
    assert [(d.request_id, d.sample_index, d.finish_reason) for d in deltas] == [
        (request_id, 0, "abort"),
        (request_id, 1, "abort"),
    ]
    assert not engine.has_unfinished_requests()
    engine.step()  # the executor forgets the beams
    assert engine.runner.requests == {}
    assert engine.scheduler.block_pool.num_used_blocks == 0
