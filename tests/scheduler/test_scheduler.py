"""Scheduler policy (services/scheduler/scheduler.py), driven by a fake executor.

The fake executor keeps a mirror of every request from the step deltas alone, exactly as
the real one must, and "samples" a token that depends on the request's whole token
sequence, like a real model would. So a wrong delta, a lost token or a bad recompute
after preemption shows up as a different output.
"""

from __future__ import annotations

import random
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.policy import QueueFullError, blocks_to_cover, stop_status
from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import ExecuteStep, RequestDelta, SampledToken, StepResult
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.scheduler.fake_kv_cache import FakeKVCache

EOS = 0
VOCAB_SIZE = 1000
FIRST_ORDINARY_TOKEN = 10  # ids below are for EOS / stop tokens; the fake model avoids them

TokenFn = Callable[[str, list[int]], int]


def model_token(request_id: str, token_ids: list[int]) -> int:
    """A deterministic stand-in for greedy decoding: a function of the whole sequence."""
    seed = zlib.crc32(request_id.encode())
    digest = zlib.crc32(array("q", token_ids).tobytes(), seed)
    return FIRST_ORDINARY_TOKEN + digest % (VOCAB_SIZE - FIRST_ORDINARY_TOKEN)


@dataclass
class Mirror:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class FakeExecutor:
    """Also keeps a fake KV cache: the token id whose K/V each slot holds. Every request
    checks, when it samples, that its block table holds exactly its tokens: so a prefix
    cache hit on the wrong block, or a block reused while someone still reads it, fails."""

    block_size: int
    token_fn: TokenFn = model_token
    with_logprobs: bool = False
    mirrors: dict[str, Mirror] = field(default_factory=dict)
    kv: FakeKVCache = field(init=False)

    def __post_init__(self) -> None:
        self.kv = FakeKVCache(self.block_size)

    def execute(self, step: ExecuteStep) -> StepResult:
        for request_id in step.dropped_request_ids:
            self.mirrors.pop(request_id)  # it must have been mirrored
        # As the real executor: all swap-outs, then all swap-ins, then the step.
        self.kv.apply_copies(step.swap_out, step.swap_in, [])
        scheduled: list[Mirror] = []
        for new in step.new_requests:
            assert new.request_id not in self.mirrors
            assert len(new.token_ids) >= new.num_prompt_tokens
            mirror = Mirror(list(new.token_ids), list(new.block_ids), new.num_computed_tokens)
            self.mirrors[new.request_id] = mirror
            scheduled.append(mirror)
        for cached in step.cached_requests:
            mirror = self.mirrors[cached.request_id]
            assert mirror.num_computed_tokens == cached.num_computed_tokens
            mirror.block_ids += cached.new_block_ids
            scheduled.append(mirror)

        sampled: list[SampledToken] = []
        request_ids = [r.request_id for r in step.new_requests + step.cached_requests]
        counts = step.num_scheduled_tokens
        for request_id, mirror, num_tokens in zip(request_ids, scheduled, counts):
            start = mirror.num_computed_tokens
            mirror.num_computed_tokens += num_tokens
            # Every slot written this step lies in the block table.
            assert mirror.num_computed_tokens <= len(mirror.block_ids) * self.block_size
            assert mirror.num_computed_tokens <= len(mirror.token_ids)
            self.kv.write(mirror.block_ids, mirror.token_ids, start, mirror.num_computed_tokens)
        for request_id, mirror in zip(request_ids, scheduled):
            if mirror.num_computed_tokens == len(mirror.token_ids):
                # What attention would read: every position's K/V, through the table.
                stored = self.kv.read(mirror.block_ids, len(mirror.token_ids))
                assert stored == mirror.token_ids, f"{request_id} reads K/V of other tokens"
                token = self.token_fn(request_id, mirror.token_ids)
                mirror.token_ids.append(token)
                logprob = -0.5 if self.with_logprobs else None
                sampled.append(SampledToken(request_id, token, logprob))
        return StepResult(step.step_id, sampled)


def make_request(
    request_id: str,
    prompt_len: int = 8,
    max_tokens: int = 16,
    arrival_time: float = 0.0,
    priority: int = 0,
    eos_token_id: int | None = EOS,
    **params: object,
) -> Request:
    prompt = [FIRST_ORDINARY_TOKEN + (i * 7 + len(request_id)) % 500 for i in range(prompt_len)]
    return Request(
        request_id,
        prompt,
        SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),  # type: ignore[arg-type]
        arrival_time=arrival_time,
        eos_token_id=eos_token_id,
        priority=priority,
    )


def reference_output(
    req: Request, max_model_len: int, token_fn: TokenFn = model_token
) -> tuple[list[int], str]:
    """What the request generates with no scheduler at all."""
    clone = Request(
        req.request_id, req.prompt_token_ids, req.sampling_params,
        arrival_time=0.0, eos_token_id=req.eos_token_id,
    )
    while True:
        token = token_fn(clone.request_id, clone.all_token_ids)
        clone.output_token_ids.append(token)
        status = stop_status(clone, token, max_model_len)
        if status is not None:
            clone.status = status
            return clone.output_token_ids, clone.finish_reason or ""


def check_pool(sched: Scheduler) -> None:
    """A used block has one reference per running request holding it (prefix-cache hits
    share blocks), a request holds a block once, waiting ones hold none."""
    holders = Counter(b for r in sched.running for b in r.block_ids)
    assert all(len(r.block_ids) == len(set(r.block_ids)) for r in sched.running)
    assert sched.block_pool.num_used_blocks == len(holders)
    assert all(sched.block_pool.ref_count(b) == n for b, n in holders.items())
    assert all(not r.block_ids and r.num_computed_tokens == 0 for r in sched.waiting)
    # A swapped request holds swap blocks only: one per block of K/V it had computed.
    block_size = sched.block_pool.block_size
    assert all(not r.swap_block_ids for r in (*sched.running, *sched.waiting))
    for req in sched.swapped:
        assert req.status == RequestStatus.SWAPPED and not req.block_ids
        assert len(req.swap_block_ids) == blocks_to_cover(req.num_computed_tokens, block_size)
    swap_holders = Counter(b for r in sched.swapped for b in r.swap_block_ids)
    assert all(n == 1 for n in swap_holders.values())
    swap_pool = sched.swap_pool
    assert (swap_pool.num_used_blocks if swap_pool else 0) == len(swap_holders)


def check_step(sched: Scheduler, step: ExecuteStep) -> None:
    cfg, block_size = sched.config.limits, sched.block_pool.block_size
    counts = step.num_scheduled_tokens
    ids = [r.request_id for r in step.new_requests + step.cached_requests]
    assert len(counts) == len(ids) == len(set(ids))
    assert all(n > 0 for n in counts)
    assert sum(counts) <= cfg.max_num_batched_tokens
    assert sched.num_running <= cfg.max_num_running <= cfg.max_num_seqs
    scheduled = dict(zip(ids, counts))
    # Decodes are never starved: every running request is in the step.
    assert set(scheduled) == {r.request_id for r in sched.running}
    for req in sched.running:  # scheduling counted the step's tokens as computed already
        assert len(req.block_ids) == blocks_to_cover(req.num_computed_tokens, block_size)
    check_pool(sched)


def check_after_update(sched: Scheduler) -> None:
    block_size = sched.block_pool.block_size
    for req in sched.running:
        assert len(req.block_ids) == blocks_to_cover(req.num_computed_tokens, block_size)
    check_pool(sched)


@dataclass
class Run:
    steps: list[ExecuteStep] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, str] = field(default_factory=dict)
    num_scheduled_ahead: int = 0  # steps scheduled while another was in flight


def step_once(sched: Scheduler, executor: FakeExecutor, run: Run) -> list[RequestDelta]:
    step = sched.schedule()
    check_step(sched, step)
    run.steps.append(step)
    deltas = sched.update_from_output(step, executor.execute(step))
    check_after_update(sched)
    record(run, deltas)
    return deltas


def step_ahead(sched: Scheduler, executor: FakeExecutor, run: Run, in_flight: deque[tuple[ExecuteStep, StepResult]]) -> None:
    """Asynchronous scheduling, as the scheduler service runs it: a step is scheduled while
    the one before it is in flight whenever the core allows, and the executor runs each
    the moment it has it, before the scheduler has the result of the one before (the
    widest gap the service allows). Then the oldest result is applied."""
    while len(in_flight) < 2 and sched.has_unfinished_requests() and (not in_flight or sched.can_schedule_ahead()):
        step = sched.schedule()
        run.steps.append(step)
        run.num_scheduled_ahead += bool(in_flight)
        in_flight.append((step, executor.execute(step)))
    if in_flight:
        step, result = in_flight.popleft()
        record(run, sched.update_from_output(step, result))
        check_pool(sched)


def record(run: Run, deltas: list[RequestDelta]) -> None:
    for delta in deltas:
        assert delta.request_id not in run.finish_reasons, "delta after finish"
        run.outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        if delta.finish_reason is not None:
            run.finish_reasons[delta.request_id] = delta.finish_reason


def run_to_completion(
    sched: Scheduler, executor: FakeExecutor, run: Run | None = None, max_steps: int = 10_000
) -> Run:
    run = run or Run()
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        step_once(sched, executor, run)
    else:
        raise AssertionError(f"not finished after {max_steps} steps")
    assert_all_free(sched)
    return run


def assert_all_free(sched: Scheduler) -> None:
    pool = sched.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))
    assert sched.num_running == sched.num_waiting == sched.num_swapped == 0
    swap_pool = sched.swap_pool
    assert swap_pool is None or swap_pool.num_free_blocks == swap_pool.num_blocks


def make_scheduler(
    num_blocks: int = 1024,
    block_size: int = 4,
    max_model_len: int = 4096,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_num_waiting: int = 1024,
    enable_prefix_caching: bool = True,
    preemption_mode: str = "recompute",
    num_swap_blocks: int = 0,
) -> Scheduler:
    config = SchedulerConfig(
        limits=SchedulingLimits(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_waiting=max_num_waiting,
            enable_prefix_caching=enable_prefix_caching,
            preemption_mode=preemption_mode,  # type: ignore[arg-type]
        )
    )
    return Scheduler(config, num_blocks, block_size, num_swap_blocks=num_swap_blocks)


# --- chunked prefill, budget, on-demand blocks -------------------------------------


def test_long_prompt_is_chunked_then_decodes() -> None:
    sched = make_scheduler(block_size=16, max_num_seqs=4, max_num_batched_tokens=32)
    sched.add_request(make_request("a", prompt_len=100, max_tokens=3))
    run = run_to_completion(sched, FakeExecutor(16))
    assert [s.num_scheduled_tokens for s in run.steps] == [[32], [32], [32], [4], [1], [1]]
    # First step ships the request whole; later ones only progress and new blocks.
    first = run.steps[0].new_requests[0]
    assert (first.num_computed_tokens, len(first.block_ids), first.num_prompt_tokens) == (0, 2, 100)
    cached = [s.cached_requests[0] for s in run.steps[1:]]
    assert [c.num_computed_tokens for c in cached] == [32, 64, 96, 100, 101]
    assert [len(c.new_block_ids) for c in cached] == [2, 2, 1, 0, 0]
    assert run.outputs["a"] == reference_output(make_request("a", 100, 3), 4096)[0]
    assert run.finish_reasons["a"] == "length"


def test_only_the_step_that_reaches_the_end_of_the_prompt_samples() -> None:
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    sched.add_request(make_request("a", prompt_len=20, max_tokens=2))
    executor, run = FakeExecutor(4), Run()
    assert step_once(sched, executor, run) == []  # 8 of 20
    assert step_once(sched, executor, run) == []  # 16 of 20
    [delta] = step_once(sched, executor, run)  # 20 of 20: first token
    assert delta.request_id == "a" and len(delta.new_token_ids) == 1


def test_cached_requests_carry_only_new_block_ids() -> None:
    sched = make_scheduler(block_size=4)
    sched.add_request(make_request("a", prompt_len=4, max_tokens=10))
    run = run_to_completion(sched, FakeExecutor(4))
    [new] = run.steps[0].new_requests
    table = list(new.block_ids)
    assert len(table) == 1
    # Step k computes token 4 + k - 1 (0-based position); a new block exactly when that
    # position starts one.
    for k, step in enumerate(run.steps[1:], start=1):
        [cached] = step.cached_requests
        position = 4 + k - 1
        assert len(cached.new_block_ids) == (1 if position % 4 == 0 else 0)
        table += cached.new_block_ids
    assert len(table) == len(set(table)) == blocks_to_cover(4 + 10 - 1, 4)


def test_running_decodes_are_scheduled_before_a_long_prompt() -> None:
    sched = make_scheduler(block_size=16, max_num_seqs=4, max_num_batched_tokens=16)
    sched.add_request(make_request("decoder", prompt_len=4, max_tokens=20, arrival_time=0))
    executor, run = FakeExecutor(16), Run()
    step_once(sched, executor, run)
    sched.add_request(make_request("long", prompt_len=200, max_tokens=2, arrival_time=1))
    for _ in range(10):
        step_once(sched, executor, run)
        step = run.steps[-1]
        ids = [r.request_id for r in step.new_requests + step.cached_requests]
        counts = dict(zip(ids, step.num_scheduled_tokens))
        assert counts["decoder"] == 1  # the decode, in every step
        assert counts["long"] == 15  # the prompt gets the rest
    run_to_completion(sched, executor, run)


def test_token_budget_and_seq_cap_are_respected() -> None:
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=10)
    for i in range(7):
        sched.add_request(make_request(f"r{i}", prompt_len=6, max_tokens=5, arrival_time=i))
    run = run_to_completion(sched, FakeExecutor(4))
    assert max(len(s.num_scheduled_tokens) for s in run.steps) == 3
    assert max(sum(s.num_scheduled_tokens) for s in run.steps) == 10
    for i in range(7):
        assert run.outputs[f"r{i}"] == reference_output(make_request(f"r{i}", 6, 5), 4096)[0]


def test_admission_is_fcfs_within_priority() -> None:
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    sched.add_request(make_request("late", arrival_time=5))
    sched.add_request(make_request("early", arrival_time=1))
    sched.add_request(make_request("urgent", arrival_time=9, priority=-1))
    sched.add_request(make_request("tie", arrival_time=1))
    assert [r.request_id for r in sched.waiting] == ["urgent", "early", "tie", "late"]
    run = run_to_completion(sched, FakeExecutor(4))
    order = [s.new_requests[0].request_id for s in run.steps if s.new_requests]
    assert order == ["urgent", "early", "tie", "late"]


def test_admission_waits_for_blocks_and_does_not_overtake() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    sched.add_request(make_request("a", prompt_len=12, max_tokens=4, arrival_time=0))  # 3 blocks
    sched.add_request(make_request("b", prompt_len=8, max_tokens=1, arrival_time=1))  # 2 blocks
    sched.add_request(make_request("c", prompt_len=2, max_tokens=1, arrival_time=2))  # 1 block
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    assert [r.request_id for r in run.steps[0].new_requests] == ["a"]  # c would fit, b is first
    run_to_completion(sched, executor, run)
    assert sched.num_preemptions_total == 0


def test_kv_utilisation() -> None:
    sched = make_scheduler(block_size=4)
    assert sched.kv_utilisation() == 0.0
    sched.add_request(make_request("a", prompt_len=5, max_tokens=10))
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    assert sched.kv_utilisation() == 5 / 8  # 5 tokens stored in 2 blocks
    step_once(sched, executor, run)
    assert sched.kv_utilisation() == 6 / 8


def test_empty_step_and_step_ids() -> None:
    sched = make_scheduler()
    steps = [sched.schedule() for _ in range(3)]
    assert [s.step_id for s in steps] == [0, 1, 2]
    assert steps[0].num_scheduled_tokens == [] and not steps[0].new_requests
    assert sched.update_from_output(steps[2], StepResult(2, [])) == []


# --- preemption ---------------------------------------------------------------------


def test_latest_arrival_is_preempted_and_resumes_with_same_output() -> None:
    # 6 blocks of 4: three 8-token prompts fill the pool; the first decode that needs a
    # block preempts the latest arrival. (The prompts are equal: without the prefix cache,
    # so that they do fill the pool and the resumed request recomputes everything.)
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    requests = [
        make_request(name, prompt_len=8, max_tokens=10, arrival_time=t)
        for t, name in enumerate("abc")
    ]
    for req in requests:
        sched.add_request(req)
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    assert sched.block_pool.num_free_blocks == 0
    step_once(sched, executor, run)
    step = run.steps[-1]
    assert step.dropped_request_ids == ["c"]  # the executor forgets it now
    assert [r.request_id for r in step.cached_requests] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]
    c = sched.get_request("c")
    assert c is not None and c.status == RequestStatus.WAITING
    assert (c.num_preemptions, c.num_computed_tokens, c.num_output_tokens) == (1, 0, 1)
    assert c.block_ids == []

    run_to_completion(sched, executor, run)
    resumed = [r for s in run.steps[2:] for r in s.new_requests if r.request_id == "c"]
    assert resumed[0].num_computed_tokens == 0
    assert resumed[0].token_ids[: resumed[0].num_prompt_tokens] == requests[2].prompt_token_ids
    assert len(resumed[0].token_ids) > resumed[0].num_prompt_tokens  # prompt + output so far
    assert resumed[0].token_ids[8:] == run.outputs["c"][: len(resumed[0].token_ids) - 8]
    for req in requests:
        assert run.outputs[req.request_id] == reference_output(req, 4096)[0]
    assert sched.num_preemptions_total >= 1


def test_preempted_request_goes_to_the_front_of_waiting() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    sched.add_request(make_request("a", prompt_len=8, max_tokens=8, arrival_time=0))
    sched.add_request(make_request("b", prompt_len=8, max_tokens=8, arrival_time=1))
    sched.add_request(make_request("c", prompt_len=2, max_tokens=8, arrival_time=2))  # seq cap
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    step_once(sched, executor, run)  # a needs a block: b is preempted
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert run.steps[-1].new_requests == []  # nothing admitted in a step that preempted
    run_to_completion(sched, executor, run)


def test_request_preempts_itself_when_it_is_the_latest() -> None:
    # b runs first (admitted first) but a arrived earlier: when b needs a block, the
    # unscheduled requests are b and a, and b is the victim. (Their prompts share a block:
    # without the prefix cache, so that the pool does fill up.)
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    sched.add_request(make_request("b", prompt_len=7, max_tokens=8, arrival_time=1))
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    sched.add_request(make_request("a", prompt_len=8, max_tokens=8, arrival_time=0))
    step_once(sched, executor, run)  # b decodes into its 2nd block, a admitted: pool full
    assert sched.block_pool.num_free_blocks == 0
    step_once(sched, executor, run)  # b needs a 3rd block
    step = run.steps[-1]
    assert step.dropped_request_ids == ["b"]
    assert [r.request_id for r in step.cached_requests] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b"]
    run_to_completion(sched, executor, run)
    assert run.outputs["b"] == reference_output(make_request("b", 7, 8, 1), 4096)[0]


def test_low_priority_is_preempted_before_late_arrival() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    sched.add_request(make_request("low", prompt_len=8, max_tokens=8, arrival_time=0, priority=1))
    sched.add_request(make_request("a", prompt_len=8, max_tokens=8, arrival_time=1))
    sched.add_request(make_request("b", prompt_len=8, max_tokens=8, arrival_time=2))
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)  # admitted by priority: a, b, low
    step_once(sched, executor, run)
    assert run.steps[-1].dropped_request_ids == ["low"]
    run_to_completion(sched, executor, run)


# --- stop conditions ----------------------------------------------------------------


def token_at(output_index: int, token: int) -> TokenFn:
    """A model that emits `token` as the output token number `output_index` (0-based)."""

    def fn(request_id: str, token_ids: list[int]) -> int:
        num_output = len(token_ids) - 8  # these tests use 8-token prompts
        return token if num_output == output_index else model_token(request_id, token_ids)

    return fn


def finish_of(req: Request, token_fn: TokenFn, max_model_len: int = 4096) -> tuple[list[int], str]:
    sched = make_scheduler(max_model_len=max_model_len)
    sched.add_request(req)
    run = run_to_completion(sched, FakeExecutor(4, token_fn))
    return run.outputs[req.request_id], run.finish_reasons[req.request_id]


def test_eos_stops() -> None:
    output, reason = finish_of(make_request("a", max_tokens=10), token_at(3, EOS))
    assert (len(output), output[-1], reason) == (4, EOS, "stop")


def test_ignore_eos_keeps_going() -> None:
    output, reason = finish_of(make_request("a", max_tokens=10, ignore_eos=True), token_at(3, EOS))
    assert (len(output), output[3], reason) == (10, EOS, "length")


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    req = make_request("a", max_tokens=10, ignore_eos=True, stop_token_ids=[5, 6])
    output, reason = finish_of(req, token_at(2, 6))
    assert (output[-1], len(output), reason) == (6, 3, "stop")


def test_max_tokens_gives_length() -> None:
    output, reason = finish_of(make_request("a", max_tokens=7), model_token)
    assert (len(output), reason) == (7, "length")


def test_max_model_len_gives_length() -> None:
    output, reason = finish_of(make_request("a", max_tokens=100), model_token, max_model_len=13)
    assert (len(output), reason) == (5, "length")  # 8 prompt + 5 = 13


def test_no_eos_token_means_only_other_conditions_stop() -> None:
    output, reason = finish_of(make_request("a", max_tokens=5, eos_token_id=None), token_at(1, EOS))
    assert (len(output), reason) == (5, "length")


def test_logprobs_reach_the_delta() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", max_tokens=2, logprobs=0))
    executor = FakeExecutor(4, with_logprobs=True)
    step = sched.schedule()
    [delta] = sched.update_from_output(step, executor.execute(step))
    assert [lp.logprob for lp in delta.logprobs] == [-0.5]


# --- abort --------------------------------------------------------------------------


def test_abort_waiting_request() -> None:
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", arrival_time=0))
    sched.add_request(make_request("b", arrival_time=1))
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    assert sched.abort_requests(["b"]) == [RequestDelta("b", [], finish_reason="abort", request_finished=True)]
    assert sched.get_request("b") is None and sched.num_waiting == 0
    step_once(sched, executor, run)
    assert run.steps[-1].dropped_request_ids == []  # the executor never saw b
    run_to_completion(sched, executor, run)


def test_abort_running_request_frees_blocks_at_once() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", prompt_len=20))
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    assert sched.block_pool.num_used_blocks == 5
    [delta] = sched.abort_requests(["a", "unknown"])
    assert delta.finish_reason == "abort"
    assert sched.block_pool.num_used_blocks == 0
    assert sched.abort_requests(["a"]) == []  # already gone
    step = sched.schedule()
    assert step.dropped_request_ids == ["a"]
    executor.execute(step)
    assert executor.mirrors == {}


def test_abort_while_step_in_flight_is_ignored_by_update() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", arrival_time=0))
    sched.add_request(make_request("b", arrival_time=1))
    executor = FakeExecutor(4)
    step = sched.schedule()
    result = executor.execute(step)
    sched.abort_requests(["a"])
    deltas = sched.update_from_output(step, result)
    assert [d.request_id for d in deltas] == ["b"]
    run_to_completion(sched, executor)


# --- validation ---------------------------------------------------------------------


def test_queue_full() -> None:
    sched = make_scheduler(max_num_waiting=2)
    sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    with pytest.raises(QueueFullError, match="2 of 2"):
        sched.add_request(make_request("c"))
    assert sched.num_waiting == 2


def test_prompt_that_can_never_fit_names_the_numbers() -> None:
    sched = make_scheduler(num_blocks=1024, block_size=16, max_model_len=32_768)
    with pytest.raises(ValueError) as excinfo:
        sched.add_request(make_request("big", prompt_len=20_000, max_tokens=1))
    message = str(excinfo.value)
    assert "1,024 blocks" in message and "16,384 tokens" in message and "20,000" in message


def test_request_that_would_outgrow_the_pool_is_rejected() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)
    sched.add_request(make_request("fits", prompt_len=8, max_tokens=9))  # peak 16 slots
    with pytest.raises(ValueError, match="needs 17"):
        sched.add_request(make_request("grows", prompt_len=8, max_tokens=10))


@pytest.mark.parametrize(
    "prompt_len, match", [(0, "empty"), (64, "max_model_len is 64"), (100, "100 tokens")]
)
def test_bad_prompts(prompt_len: int, match: str) -> None:
    sched = make_scheduler(max_model_len=64)
    with pytest.raises(ValueError, match=match):
        sched.add_request(make_request("a", prompt_len=prompt_len))


def test_duplicate_request_id() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("a"))


def test_seq_cap_never_exceeds_the_token_budget() -> None:
    # More running requests than tokens per step would leave some without a decode.
    config = SchedulerConfig(limits=SchedulingLimits(max_model_len=128, max_num_seqs=64, max_num_batched_tokens=4))
    assert config.max_num_running == 4
    sched = Scheduler(config, num_blocks=256, block_size=4)
    for i in range(10):
        sched.add_request(make_request(f"r{i}", prompt_len=1, max_tokens=6, arrival_time=i))
    run = run_to_completion(sched, FakeExecutor(4))  # checks all running are scheduled
    assert max(len(s.num_scheduled_tokens) for s in run.steps) == 4
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulingLimits(max_model_len=128, max_num_seqs=0)


def test_result_that_disagrees_with_the_step_is_rejected_untouched() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", prompt_len=20))
    step = sched.schedule()
    with pytest.raises(ValueError, match="middle of its prompt"):
        sched.update_from_output(step, StepResult(step.step_id, [SampledToken("a", 42)]))
    with pytest.raises(ValueError, match="not in the step"):
        sched.update_from_output(step, StepResult(step.step_id, [SampledToken("zz", 42)]))
    with pytest.raises(ValueError, match="step 7"):
        sched.update_from_output(step, StepResult(7, []))
    # Counted as computed when scheduled; the rejected results left the step in flight.
    assert sched.get_request("a").num_computed_tokens == 8  # type: ignore[union-attr]
    assert sched.update_from_output(step, StepResult(step.step_id, [])) == []
    with pytest.raises(ValueError, match="not in flight"):  # once only
        sched.update_from_output(step, StepResult(step.step_id, []))
    step = sched.schedule()  # tokens 8..16
    sched.update_from_output(step, StepResult(step.step_id, []))
    step = sched.schedule()  # the last 4 prompt tokens: must sample
    with pytest.raises(ValueError, match="sampled nothing"):
        sched.update_from_output(step, StepResult(step.step_id, []))
    assert sched.get_request("a").num_output_tokens == 0  # type: ignore[union-attr]
    assert sched.update_from_output(step, StepResult(step.step_id, [SampledToken("a", 42)]))[0].new_token_ids == [42]


# --- random workloads ---------------------------------------------------------------


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_random_workload_has_no_leaks_and_matches_reference(
    seed: int, enable_prefix_caching: bool, preemption_mode: str
) -> None:
    """Odd seeds schedule asynchronously (`step_ahead`), even ones synchronously: both
    must give every request exactly its reference output."""
    asynchronous = seed % 2 == 1
    in_flight: deque[tuple[ExecuteStep, StepResult]] = deque()
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    max_model_len = rng.choice([48, 128, 512])
    max_num_seqs = rng.choice([1, 3, 8, 16])
    min_blocks = blocks_to_cover(max_model_len, block_size)
    # Swap pools from none (all recompute) through too small (some fall back) to roomy;
    # drawn apart so that both modes see the same workload.
    num_swap_blocks = 0
    if preemption_mode == "swap":
        num_swap_blocks = random.Random(-seed).choice([0, 1, min_blocks // 2, min_blocks, 4 * min_blocks])
    sched = make_scheduler(
        # From just enough for one request at max_model_len: preemption is common.
        num_blocks=rng.randint(min_blocks, 2 * min_blocks),
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=rng.choice([1, max_num_seqs, 16, 64, 256]),
        max_num_waiting=rng.choice([4, 1024]),
        enable_prefix_caching=enable_prefix_caching,
        preemption_mode=preemption_mode,
        num_swap_blocks=num_swap_blocks,
    )
    executor, run = FakeExecutor(block_size), Run()
    requests: dict[str, Request] = {}
    aborted: set[str] = set()
    num_to_add = rng.randint(1, 40)
    for step_index in range(5_000):
        if num_to_add and rng.random() < 0.5:
            request_id = f"s{seed}-r{len(requests)}"
            req = make_request(
                request_id,
                prompt_len=rng.randint(1, max_model_len - 1),
                max_tokens=rng.randint(1, 40),
                arrival_time=float(step_index),
                priority=rng.choice([0, 0, 0, 1, -1]),
                stop_token_ids=rng.sample(range(FIRST_ORDINARY_TOKEN, VOCAB_SIZE), 20),
            )
            try:
                sched.add_request(req)
            except QueueFullError:
                pass
            else:
                requests[request_id] = req
                num_to_add -= 1
        if requests and rng.random() < 0.03:
            victim = rng.choice(sorted(requests))
            if sched.abort_requests([victim]):
                aborted.add(victim)
                run.finish_reasons[victim] = "abort"
        if not num_to_add and not sched.has_unfinished_requests() and not in_flight:
            break
        if asynchronous:
            step_ahead(sched, executor, run, in_flight)
        else:
            step_once(sched, executor, run)
    else:
        raise AssertionError("workload did not finish")

    assert_all_free(sched)
    assert sched.kv_utilisation() == 0.0
    assert run.num_scheduled_ahead > 0 if asynchronous else run.num_scheduled_ahead == 0
    for request_id, req in requests.items():
        if request_id in aborted:
            continue
        expected, reason = reference_output(req, max_model_len)
        assert run.outputs[request_id] == expected
        assert run.finish_reasons[request_id] == reason
    executor.execute(sched.schedule())  # last finished ids reach the executor
    assert executor.mirrors == {}
