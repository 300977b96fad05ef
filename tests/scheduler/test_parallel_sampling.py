"""Parallel sampling (`n > 1`) in the scheduler: one request whose samples fork off it when
its prompt is computed, share its blocks and copy the partly filled last one on their
first write (copy-on-write).

Driven by a fake executor that mirrors requests from the step deltas alone (forks and
block copies included) and keeps a fake KV cache: the token id whose K/V each slot holds.
Every request checks, when it samples, that its block table holds exactly its tokens, so
a sample writing into a block another still reads, a missed copy or a block reused while
referenced shows up. Its "model" draws a token from (seed, tokens so far), as a seeded
sampler does, so a sample must equal a separate request made with its seed.
"""

from __future__ import annotations

import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import ExecuteStep, RequestDelta, SampledToken, StepResult
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.scheduler.fake_kv_cache import FakeKVCache

EOS = 0
FIRST_ORDINARY_TOKEN = 10


def seeded_token(seed: int | None, token_ids: list[int]) -> int:
    """A stand-in for seeded sampling: a function of the seed and the whole sequence."""
    digest = zlib.crc32(array("q", token_ids).tobytes(), (seed or 0) & 0xFFFFFFFF)
    return FIRST_ORDINARY_TOKEN + digest % 990


def beam_candidates(request_id: str, mirror: Mirror) -> SampledToken:
    """A stand-in for a beam's report: distinct tokens (EOS among them now and then) with
    descending logprobs, a function of the sequence only."""
    count = mirror.params.num_beam_candidates(EOS)
    digest = zlib.crc32(array("q", mirror.token_ids).tobytes())
    token_ids = [FIRST_ORDINARY_TOKEN + (digest + 37 * i) % 990 for i in range(count)]
    if digest % 5 == 0:
        token_ids[digest % count] = EOS
    logprobs = [-0.1 - 0.7 * i - (digest % 97) / 100 for i in range(count)]
    return SampledToken(request_id, token_ids[0], logprobs[0], token_ids, logprobs)


@dataclass
class Mirror:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams


@dataclass
class ForkingExecutor:
    block_size: int
    mirrors: dict[str, Mirror] = field(default_factory=dict)
    kv: FakeKVCache = field(init=False)

    def __post_init__(self) -> None:
        self.kv = FakeKVCache(self.block_size)

    def execute(self, step: ExecuteStep) -> StepResult:
        for fork in step.beam_forks:  # before anything else, as the model runner does
            parent = self.mirrors[fork.parent_request_id]
            assert fork.request_id not in self.mirrors
            self.mirrors[fork.request_id] = Mirror(
                list(parent.token_ids), list(parent.block_ids), parent.num_computed_tokens, parent.params
            )
        for request_id in step.dropped_request_ids:
            self.mirrors.pop(request_id)  # it must have been mirrored
        self.kv.apply_copies(step.swap_out, step.swap_in, step.block_copies)
        scheduled: list[tuple[str, Mirror]] = []
        for new in step.new_requests:
            assert new.request_id not in self.mirrors
            mirror = Mirror(list(new.token_ids), list(new.block_ids), new.num_computed_tokens, new.sampling_params)
            self.mirrors[new.request_id] = mirror
            scheduled.append((new.request_id, mirror))
        for cached in step.cached_requests:
            mirror = self.mirrors[cached.request_id]
            assert mirror.num_computed_tokens == cached.num_computed_tokens
            if cached.num_replaced_blocks:
                del mirror.block_ids[-cached.num_replaced_blocks :]
            mirror.block_ids += cached.new_block_ids
            mirror.token_ids += cached.new_token_ids
            scheduled.append((cached.request_id, mirror))
        for (_, mirror), num_tokens in zip(scheduled, step.num_scheduled_tokens):
            start = mirror.num_computed_tokens
            mirror.num_computed_tokens += num_tokens
            assert mirror.num_computed_tokens <= len(mirror.block_ids) * self.block_size
            self.kv.write(mirror.block_ids, mirror.token_ids, start, mirror.num_computed_tokens)
        sampled: list[SampledToken] = []
        sampling = [(rid, m) for rid, m in scheduled if m.num_computed_tokens == len(m.token_ids)]
        for fork in step.forked_requests:
            parent = self.mirrors[fork.parent_request_id]
            assert parent.num_computed_tokens == len(parent.token_ids), "forked off a request that does not sample"
            child = Mirror(
                list(parent.token_ids), list(parent.block_ids), parent.num_computed_tokens,
                parent.params.for_sample(fork.sample_index),
            )
            self.mirrors[fork.request_id] = child
            sampling.append((fork.request_id, child))
        for request_id, mirror in sampling:
            stored = self.kv.read(mirror.block_ids, len(mirror.token_ids))
            assert stored == mirror.token_ids, f"{request_id} reads K/V of other tokens"
            if mirror.params.use_beam_search:  # candidates; the scheduler picks and sends one
                sampled.append(beam_candidates(request_id, mirror))
                continue
            token = seeded_token(mirror.params.seed, mirror.token_ids)
            mirror.token_ids.append(token)
            sampled.append(SampledToken(request_id, token))
        return StepResult(step.step_id, sampled)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, num_swap_blocks: int = 0, **config: object) -> Scheduler:
    defaults: dict[str, object] = dict(max_model_len=256, max_num_batched_tokens=64, enable_prefix_caching=False)
    defaults.update(config)
    limits = SchedulingLimits(**defaults)  # type: ignore[arg-type]
    return Scheduler(SchedulerConfig(limits=limits), num_blocks, block_size, num_swap_blocks=num_swap_blocks)


def make_request(request_id: str, prompt_len: int, max_tokens: int = 8, **params: object) -> Request:
    prompt = [FIRST_ORDINARY_TOKEN + (i * 7 + len(request_id)) % 500 for i in range(prompt_len)]
    params.setdefault("seed", 100)
    return Request(
        request_id, prompt, SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        arrival_time=0.0, eos_token_id=EOS,
    )


def check_pool(sched: Scheduler) -> None:
    """A used block has one reference per running request holding it; none is leaked."""
    holders = Counter(b for r in sched.running for b in r.block_ids)
    assert sched.block_pool.num_used_blocks == len(holders)
    assert all(sched.block_pool.ref_count(b) == n for b, n in holders.items())
    assert all(not r.block_ids for r in sched.waiting)


@dataclass
class Outputs:
    tokens: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    finish_reasons: dict[tuple[str, int], str] = field(default_factory=dict)

    def record(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            key = (delta.request_id, delta.sample_index)
            assert key not in self.finish_reasons, "delta after finish"
            self.tokens.setdefault(key, []).extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                self.finish_reasons[key] = delta.finish_reason


def step(sched: Scheduler, executor: ForkingExecutor, outputs: Outputs) -> ExecuteStep:
    execute_step = sched.schedule()
    outputs.record(sched.update_from_output(execute_step, executor.execute(execute_step)))
    check_pool(sched)
    return execute_step


def run_to_end(sched: Scheduler, executor: ForkingExecutor, outputs: Outputs, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        step(sched, executor, outputs)
    assert not sched.has_unfinished_requests()
    assert sched.block_pool.num_used_blocks == 0, "blocks leaked"


def separate_outputs(req: Request, block_size: int = 4) -> dict[int, list[int]]:
    """The tokens of each sample run as a separate n=1 request with seed `seed + i`."""
    sched = make_scheduler(block_size=block_size)
    for i in range(req.sampling_params.n):
        sched.add_request(
            Request(f"sep{i}", req.prompt_token_ids, req.sampling_params.for_sample(i), arrival_time=0.0, eos_token_id=EOS)
        )
    outputs = Outputs()
    run_to_end(sched, ForkingExecutor(block_size), outputs)
    return {i: outputs.tokens[(f"sep{i}", 0)] for i in range(req.sampling_params.n)}


def test_samples_share_every_prompt_block_after_the_prompt_step() -> None:
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    sched.add_request(make_request("a", prompt_len=10, n=3))
    first = step(sched, executor, outputs)
    assert [f.request_id for f in first.forked_requests] == ["a#1", "a#2"]
    assert [f.sample_index for f in first.forked_requests] == [1, 2]
    samples = sched.running
    assert [r.request_id for r in samples] == ["a", "a#1", "a#2"]
    assert all(r.block_ids == samples[0].block_ids for r in samples)
    assert len(samples[0].block_ids) == 3
    assert all(sched.block_pool.ref_count(b) == 3 for b in samples[0].block_ids)
    assert sched.block_pool.num_used_blocks == 3
    # Each sample reports its first token under the request's id, with its index.
    assert sorted(outputs.tokens) == [("a", 0), ("a", 1), ("a", 2)]


def test_first_write_into_the_shared_partial_block_copies_it_n_minus_1_times() -> None:
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    sched.add_request(make_request("a", prompt_len=10, n=3))  # last block holds 2 of 4
    step(sched, executor, outputs)
    shared = list(sched.running[0].block_ids)
    second = step(sched, executor, outputs)
    # The first two writers copy; the last one, holding it alone by then, writes in place.
    assert [src for src, _ in second.block_copies] == [shared[-1], shared[-1]]
    assert [c.num_replaced_blocks for c in second.cached_requests] == [1, 1, 0]
    tables = [r.block_ids for r in sched.running]
    assert all(t[:2] == shared[:2] for t in tables)  # full blocks stay shared
    assert len({t[-1] for t in tables}) == 3
    assert all(sched.block_pool.ref_count(b) == 3 for b in shared[:2])
    assert all(sched.block_pool.ref_count(t[-1]) == 1 for t in tables)
    # Later steps copy nothing: no block is written while shared any more.
    for _ in range(3):
        assert step(sched, executor, outputs).block_copies == []


def test_no_copy_when_the_prompt_fills_its_last_block() -> None:
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    sched.add_request(make_request("a", prompt_len=8, n=4))
    step(sched, executor, outputs)
    assert sched.block_pool.num_used_blocks == 2
    second = step(sched, executor, outputs)
    assert second.block_copies == []
    assert all(c.num_replaced_blocks == 0 and len(c.new_block_ids) == 1 for c in second.cached_requests)
    assert sched.block_pool.num_used_blocks == 2 + 4


@pytest.mark.parametrize("prompt_len", [1, 7, 8, 13])
@pytest.mark.parametrize("max_num_batched_tokens", [5, 64])  # 5: chunked prefill
def test_samples_equal_separate_requests_with_seeds_seed_plus_i(prompt_len: int, max_num_batched_tokens: int) -> None:
    req = make_request("a", prompt_len=prompt_len, max_tokens=9, n=4, seed=41)
    expected = separate_outputs(req)
    sched, executor, outputs = make_scheduler(max_num_batched_tokens=max_num_batched_tokens), ForkingExecutor(4), Outputs()
    sched.add_request(req)
    run_to_end(sched, executor, outputs)
    assert {i: outputs.tokens[("a", i)] for i in range(4)} == expected
    assert all(outputs.finish_reasons[("a", i)] == "length" for i in range(4))
    assert len(set(map(tuple, expected.values()))) > 1  # the seeds do differ


def test_forked_group_uses_fewer_blocks_than_separate_requests() -> None:
    def peak_blocks(n: int, forked: bool) -> int:
        sched, executor, outputs = make_scheduler(num_blocks=256), ForkingExecutor(4), Outputs()
        if forked:
            sched.add_request(make_request("a", prompt_len=30, max_tokens=6, n=n))
        else:
            for i in range(n):
                sched.add_request(make_request(f"a{i}", prompt_len=30, max_tokens=6, seed=100 + i))
        peak = 0
        while sched.has_unfinished_requests():
            step(sched, executor, outputs)
            peak = max(peak, sched.block_pool.num_used_blocks)
        return peak

    # 30 prompt tokens = 7 blocks + 2 tokens; 6 outputs reach position 34: 9 blocks each.
    assert peak_blocks(4, forked=False) == 4 * 9
    assert peak_blocks(4, forked=True) == 7 + 4 * 2


def test_parent_finishing_on_its_first_token_leaves_the_samples_running() -> None:
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    req = make_request("a", prompt_len=6, max_tokens=5, n=3, stop_token_ids=[])
    sched.add_request(req)
    first = sched.schedule()
    result = executor.execute(first)
    # The parent samples a stop token; its samples draw their own.
    req.sampling_params = SamplingParams(max_tokens=5, seed=100, n=3, stop_token_ids=[result.sampled[0].token_id])
    outputs.record(sched.update_from_output(first, result))
    check_pool(sched)
    assert outputs.finish_reasons == {("a", 0): "stop"}
    assert [r.request_id for r in sched.running] == ["a#1", "a#2"]
    run_to_end(sched, executor, outputs)
    assert outputs.finish_reasons == {("a", 0): "stop", ("a", 1): "length", ("a", 2): "length"}


def test_abort_of_the_request_aborts_every_sample_and_frees_all_blocks() -> None:
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    sched.add_request(make_request("a", prompt_len=10, max_tokens=20, n=3))
    sched.add_request(make_request("b", prompt_len=5, max_tokens=20))
    for _ in range(3):
        step(sched, executor, outputs)
    deltas = sched.abort_requests(["a"])
    assert [(d.request_id, d.sample_index, d.finish_reason) for d in deltas] == [
        ("a", 0, "abort"), ("a", 1, "abort"), ("a", 2, "abort")
    ]
    assert [r.request_id for r in sched.running] == ["b"]
    check_pool(sched)
    run_to_end(sched, executor, outputs)  # the executor is told to forget all three
    assert sched.abort_requests(["a"]) == []


def test_abort_of_one_sample_keeps_the_others_and_their_shared_blocks() -> None:
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    req = make_request("a", prompt_len=10, max_tokens=8, n=3)
    expected = separate_outputs(req)
    sched.add_request(req)
    step(sched, executor, outputs)
    assert [(d.request_id, d.sample_index) for d in sched.abort_requests(["a#1"])] == [("a", 1)]
    check_pool(sched)
    assert all(sched.block_pool.ref_count(b) == 2 for b in sched.running[0].block_ids)
    run_to_end(sched, executor, outputs)
    assert outputs.tokens[("a", 0)] == expected[0] and outputs.tokens[("a", 2)] == expected[2]


def test_abort_while_the_forking_step_runs_makes_the_executor_forget_the_samples() -> None:
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    sched.add_request(make_request("a", prompt_len=10, n=3))
    first = sched.schedule()
    result = executor.execute(first)
    sched.abort_requests(["a"])
    assert sched.update_from_output(first, result) == []
    assert set(executor.mirrors) == {"a", "a#1", "a#2"}
    step(sched, executor, outputs)
    assert executor.mirrors == {}
    assert sched.block_pool.num_used_blocks == 0


# --- the end of a client request (RequestDelta.request_finished) -------------------


def finished_flags(deltas: list[RequestDelta]) -> list[tuple[str, int, str | None, bool]]:
    return [(d.request_id, d.sample_index, d.finish_reason, d.request_finished) for d in deltas]


def step_stopping(
    sched: Scheduler, executor: ForkingExecutor, stopping: tuple[str, ...] = ()
) -> list[RequestDelta]:
    """One step in which the sequences `stopping` sample a stop token: the token each
    draws becomes one of its stop tokens before the result is applied."""
    execute_step = sched.schedule()
    result = executor.execute(execute_step)
    for token in result.sampled:
        if token.sequence_id in stopping:
            req = sched.get_request(token.sequence_id)
            assert req is not None
            req.sampling_params = msgspec.structs.replace(req.sampling_params, stop_token_ids=[token.token_id])
    deltas = sched.update_from_output(execute_step, result)
    check_pool(sched)
    return deltas


def test_only_the_last_sample_to_finish_ends_the_request() -> None:
    """n = 3 samples finishing at three different steps: only the delta of the last one
    carries request_finished; another request finishing meanwhile ends on its own."""
    sched, executor = make_scheduler(), ForkingExecutor(4)
    sched.add_request(make_request("a", prompt_len=6, max_tokens=4, n=3))
    sched.add_request(make_request("b", prompt_len=6, max_tokens=2))
    assert finished_flags(step_stopping(sched, executor)) == [
        ("a", 0, None, False), ("a", 1, None, False), ("a", 2, None, False), ("b", 0, None, False)
    ]
    assert finished_flags(step_stopping(sched, executor, ("a#1",))) == [
        ("a", 0, None, False), ("b", 0, "length", True), ("a", 1, "stop", False), ("a", 2, None, False)
    ]
    assert finished_flags(step_stopping(sched, executor, ("a",))) == [("a", 0, "stop", False), ("a", 2, None, False)]
    assert finished_flags(step_stopping(sched, executor)) == [("a", 2, "length", True)]
    assert not sched.has_unfinished_requests()


def test_a_beam_search_ends_with_its_last_hypothesis() -> None:
    """A beam search reports nothing until it ends, then its n hypotheses at once: the
    last of them carries request_finished."""
    sched, executor = make_scheduler(), ForkingExecutor(4)
    sched.add_request(make_request("a", prompt_len=6, max_tokens=3, beam_width=3, n=2, seed=None))
    deltas: list[RequestDelta] = []
    while sched.has_unfinished_requests():
        deltas += step_stopping(sched, executor)
    assert [(d.sample_index, d.finish_reason is not None, d.request_finished) for d in deltas] == [
        (0, True, False), (1, True, True)
    ]


def test_an_abort_ends_the_request_on_its_last_delta() -> None:
    """Aborting a request with n samples: one "abort" delta per sample, the last one ending
    it; aborting one sample alone does not end the request."""
    sched, executor = make_scheduler(), ForkingExecutor(4)
    sched.add_request(make_request("a", prompt_len=6, max_tokens=8, n=3))
    step_stopping(sched, executor)
    assert finished_flags(sched.abort_requests(["a#2"])) == [("a", 2, "abort", False)]
    assert finished_flags(sched.abort_requests(["a"])) == [("a", 0, "abort", False), ("a", 1, "abort", True)]
    sched.add_request(make_request("beams", prompt_len=6, max_tokens=8, beam_width=2, n=2, seed=None))
    step_stopping(sched, executor)
    assert finished_flags(sched.abort_requests(["beams"])) == [
        ("beams", 0, "abort", False), ("beams", 1, "abort", True)
    ]


@pytest.mark.parametrize(
    ("prefix_caching", "preemption_mode"), [(False, "recompute"), (True, "recompute"), (True, "swap")]
)
def test_preempted_samples_still_equal_separate_requests(prefix_caching: bool, preemption_mode: str) -> None:
    """Too few blocks for every sample's output: samples are preempted one by one (the
    latest forked first), recomputed or swapped as requests of their own (a swapped sample
    takes copies of the blocks it shared), and give the same tokens."""
    reqs = [make_request("a", prompt_len=9, max_tokens=24, n=4, seed=7), make_request("b", prompt_len=5, max_tokens=24, n=2)]
    expected = {r.request_id: separate_outputs(r) for r in reqs}
    sched = make_scheduler(
        num_blocks=14, enable_prefix_caching=prefix_caching, preemption_mode=preemption_mode, num_swap_blocks=32
    )
    executor, outputs = ForkingExecutor(4), Outputs()
    for req in reqs:
        sched.add_request(req)
    run_to_end(sched, executor, outputs)
    assert sched.num_preemptions_total > 0
    assert (sched.num_swap_outs_total > 0) == (preemption_mode == "swap")
    for req in reqs:
        assert {i: outputs.tokens[(req.request_id, i)] for i in range(req.sampling_params.n)} == expected[req.request_id]


def test_prefix_cache_hit_then_fork_shares_the_cached_blocks() -> None:
    sched, executor, outputs = make_scheduler(enable_prefix_caching=True), ForkingExecutor(4), Outputs()
    sched.add_request(make_request("a", prompt_len=13, max_tokens=3))
    run_to_end(sched, executor, outputs)
    req = make_request("a2", prompt_len=13, max_tokens=5, n=2)
    req.prompt_token_ids = make_request("a", prompt_len=13).prompt_token_ids
    expected = separate_outputs(req)
    sched.add_request(req)
    step(sched, executor, outputs)
    assert sched.prefix_cache_stats.num_hit_tokens == 12
    run_to_end(sched, executor, outputs)
    assert {i: outputs.tokens[("a2", i)] for i in range(2)} == expected


class ParallelSamplingMachine(RuleBasedStateMachine):
    """Random requests with n samples, steps, aborts of whole requests or single samples,
    on a small pool (so preemption happens): no block is written or reused while another
    request still reads it (the fake executor checks every read), ref counts equal the
    number of holders, and once everything is finished or aborted no block is held."""

    def __init__(self) -> None:
        super().__init__()
        self.sched = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=True)
        self.executor = ForkingExecutor(4)
        self.outputs = Outputs()
        self.num_added = 0

    @rule(prompt_len=st.integers(1, 14), max_tokens=st.integers(1, 12), n=st.integers(1, 4), shared_prompt=st.booleans())
    def add(self, prompt_len: int, max_tokens: int, n: int, shared_prompt: bool) -> None:
        req = make_request(f"r{self.num_added}", prompt_len, max_tokens, n=n, seed=self.num_added)
        if shared_prompt:  # prefix cache hits on earlier requests' blocks
            req.prompt_token_ids = make_request("r", prompt_len).prompt_token_ids
        self.num_added += 1
        if self.sched.num_waiting < 8:
            self.sched.add_request(req)

    @rule(num_steps=st.integers(1, 6))
    def run_steps(self, num_steps: int) -> None:
        for _ in range(num_steps):
            if self.sched.has_unfinished_requests():
                step(self.sched, self.executor, self.outputs)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        alive = [r.request_id for r in (*self.sched.running, *self.sched.waiting)]
        if alive:
            self.outputs.record(self.sched.abort_requests([data.draw(st.sampled_from(alive))]))

    @invariant()
    def pool_consistent(self) -> None:
        check_pool(self.sched)
        pool = self.sched.block_pool
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks

    def teardown(self) -> None:
        run_to_end(self.sched, self.executor, self.outputs)
        self.executor.execute(self.sched.schedule())  # tells the executor who finished
        assert self.executor.mirrors == {}


TestParallelSamplingMachine = ParallelSamplingMachine.TestCase
TestParallelSamplingMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_admission_keeps_sequence_slots_for_the_samples_and_rejects_n_over_the_cap() -> None:
    sched, executor, outputs = make_scheduler(max_num_seqs=4), ForkingExecutor(4), Outputs()
    with pytest.raises(ValueError, match="n=5 samples but at most 4 sequences"):
        sched.add_request(make_request("big", prompt_len=4, n=5))
    sched.add_request(make_request("a", prompt_len=4, n=3))
    sched.add_request(make_request("b", prompt_len=4, n=2))
    step(sched, executor, outputs)
    assert [r.request_id for r in sched.running] == ["a", "a#1", "a#2"]  # b would need 2 more
    run_to_end(sched, executor, outputs)
    assert len(outputs.finish_reasons) == 5


class SwappingParallelSamplingMachine(ParallelSamplingMachine):
    """The same with preemption by swap (a small swap pool: some victims still recompute)."""

    def __init__(self) -> None:
        super().__init__()
        self.sched = make_scheduler(
            num_blocks=24, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=True,
            preemption_mode="swap", num_swap_blocks=10,
        )


TestSwappingParallelSamplingMachine = SwappingParallelSamplingMachine.TestCase
TestSwappingParallelSamplingMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class BeamSearchMachine(ParallelSamplingMachine):
    """The same with beam-search requests among the others: beams fork, copy-on-write,
    are freed when not picked and are preempted as whole groups, and still no block is
    read with another sequence's K/V, none is held twice or leaked, and each search ends
    with its n hypotheses."""

    @rule(prompt_len=st.integers(1, 10), max_tokens=st.integers(1, 8), width=st.integers(2, 3), data=st.data())
    def add_beam_search(self, prompt_len: int, max_tokens: int, width: int, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, width))
        req = make_request(f"r{self.num_added}", prompt_len, max_tokens, beam_width=width, n=n, seed=None)
        self.num_added += 1
        self.beam_requests[req.request_id] = n
        if self.sched.num_waiting < 8:
            self.sched.add_request(req)
        else:
            del self.beam_requests[req.request_id]

    def __init__(self) -> None:
        super().__init__()
        self.beam_requests: dict[str, int] = {}

    def teardown(self) -> None:
        super().teardown()
        for request_id, n in self.beam_requests.items():
            assert [self.outputs.finish_reasons.get((request_id, i)) is not None for i in range(n)] == [True] * n
            assert (request_id, n) not in self.outputs.finish_reasons


TestBeamSearchMachine = BeamSearchMachine.TestCase
TestBeamSearchMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_sample_stopped_by_the_gateway_alone_is_aborted_and_its_own_blocks_freed() -> None:
    """`abort_samples`: a stop string ended sample 0 (the request's own sequence) at the
    gateway; samples 1 and 2 go on to exactly their tokens, sample 0's private blocks are
    freed now, and the request ends with its last sample."""
    sched, executor, outputs = make_scheduler(), ForkingExecutor(4), Outputs()
    req = make_request("a", prompt_len=10, max_tokens=12, n=3)
    expected = separate_outputs(req)
    sched.add_request(req)
    for _ in range(6):  # prompt, fork, then decodes: each sample has blocks of its own
        step(sched, executor, outputs)
    used_before = sched.block_pool.num_used_blocks
    sample_0 = next(r for r in sched.running if r.request_id == "a")
    private = [b for b in sample_0.block_ids if sched.block_pool.ref_count(b) == 1]
    assert private
    deltas = sched.abort_samples("a", [0])
    assert [(d.request_id, d.sample_index, d.finish_reason, d.request_finished) for d in deltas] == [("a", 0, "abort", False)]
    check_pool(sched)
    assert sched.block_pool.num_used_blocks == used_before - len(private)
    assert sorted(r.sample_index for r in sched.running) == [1, 2]
    assert sched.abort_samples("a", [0, 7]) == []  # already gone, or never was
    run_to_end(sched, executor, outputs)
    assert outputs.tokens[("a", 1)] == expected[1] and outputs.tokens[("a", 2)] == expected[2]
