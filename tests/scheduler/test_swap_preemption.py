"""Preemption by swap (services/scheduler/scheduler.py, `preemption_mode="swap"`), driven
by the fake executor of test_scheduler.py. Its fake KV cache copies block contents on
swap-out and swap-in exactly as the real executor does (all swap-outs, then all swap-ins,
then the step), and every request checks what its block table holds when it samples: so a
swap pair that points at the wrong block, or a block overwritten before it was copied,
fails the run."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from pagedserve.services.launcher import free_port
from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.executor_group import ExecutorGroup
from pagedserve.services.scheduler.request import RequestStatus
from pagedserve.services.scheduler.service import SchedulerService, SchedulerServiceConfig
from pagedserve.services.scheduler.status import block_pool_status, request_status
from pagedserve.shared.messages import ExecuteStep, ExecutorReady, StepMessage
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.scheduler.test_scheduler import (
    FakeExecutor,
    Run,
    make_request,
    make_scheduler,
    reference_output,
    run_to_completion,
    step_once,
)
from tests.scheduler.test_executor_loss import FreshExecutor


def first_admissions(run: Run, after_step: int) -> list[str]:
    """Request ids in the order they (re)joined the batch after step `after_step`."""
    order: list[str] = []
    for step in run.steps[after_step:]:
        order += [new.request_id for new in step.new_requests if new.request_id not in order]
    return order


def test_latest_arrival_is_swapped_out_and_back_in_without_recompute() -> None:
    # 6 blocks of 4: three 8-token prompts fill the pool; the first decode that needs a
    # block swaps out the latest arrival (the same victim as recompute would pick).
    sched = make_scheduler(
        num_blocks=6, block_size=4, enable_prefix_caching=False, preemption_mode="swap", num_swap_blocks=8
    )
    requests = [make_request(name, prompt_len=8, max_tokens=10, arrival_time=t) for t, name in enumerate("abc")]
    for req in requests:
        sched.add_request(req)
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    c = sched.get_request("c")
    assert c is not None
    c_blocks = list(c.block_ids)
    step_once(sched, executor, run)
    step = run.steps[-1]
    assert step.dropped_request_ids == ["c"]  # the executor forgets its mirror
    assert [r.request_id for r in step.cached_requests] == ["a", "b"]
    assert step.swap_out == list(zip(c_blocks, c.swap_block_ids)) and step.swap_in == []
    assert c.status == RequestStatus.SWAPPED and c.block_ids == []
    assert (c.num_preemptions, c.num_computed_tokens, c.num_output_tokens) == (1, 8, 1)
    assert sched.swapped == (c,) and sched.num_waiting == 0
    assert request_status(c).status == "swapped"
    status = block_pool_status(sched)
    assert (status.num_swap_blocks, status.num_used_swap_blocks, status.num_swap_outs) == (8, 2, 1)

    swap_blocks = list(c.swap_block_ids)
    run_to_completion(sched, executor, run)
    [resume] = [s for s in run.steps[2:] if any(r.request_id == "c" for r in s.new_requests)]
    [resumed] = [r for r in resume.new_requests if r.request_id == "c"]
    assert resume.swap_in == list(zip(swap_blocks, resumed.block_ids))
    assert resumed.num_computed_tokens == 8  # its K/V came back: nothing is recomputed
    assert resumed.token_ids == requests[2].prompt_token_ids + run.outputs["c"][:1]
    for req in requests:
        assert run.outputs[req.request_id] == reference_output(req, 4096)[0]
    assert sched.num_swap_outs_total == sched.num_swap_ins_total == sched.num_preemptions_total >= 1


def test_swapped_requests_come_back_in_order_before_waiting_ones() -> None:
    # 8 blocks of 4, four 8-token prompts: all full. a's and b's decodes need a block
    # each: d is swapped out first, then c (the latest not yet scheduled). e arrives
    # meanwhile; it waits until both are back, and c comes back before d.
    sched = make_scheduler(
        num_blocks=8, block_size=4, enable_prefix_caching=False, preemption_mode="swap", num_swap_blocks=16
    )
    requests = [make_request(name, prompt_len=8, max_tokens=8, arrival_time=t) for t, name in enumerate("abcd")]
    for req in requests:
        sched.add_request(req)
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    late = make_request("e", prompt_len=4, max_tokens=4, arrival_time=10)
    sched.add_request(late)
    step_once(sched, executor, run)
    assert run.steps[-1].dropped_request_ids == ["d", "c"]
    assert [r.request_id for r in sched.swapped] == ["c", "d"]
    assert [r.request_id for r in sched.waiting] == ["e"]
    while sched.num_swapped:
        assert sched.get_request("e").status == RequestStatus.WAITING  # type: ignore[union-attr]
        step_once(sched, executor, run)
    run_to_completion(sched, executor, run)
    assert first_admissions(run, 2) == ["c", "d", "e"]
    for req in [*requests, late]:
        assert run.outputs[req.request_id] == reference_output(req, 4096)[0]
    assert sched.num_preemptions_total == sched.num_swap_outs_total >= 2


def test_victim_the_swap_pool_cannot_hold_is_recomputed() -> None:
    # As above with room for one victim's 2 blocks: d is swapped, c falls back to
    # recompute. d comes back before c, although c arrived first: swapped go first.
    sched = make_scheduler(
        num_blocks=8, block_size=4, enable_prefix_caching=False, preemption_mode="swap", num_swap_blocks=2
    )
    requests = [make_request(name, prompt_len=8, max_tokens=8, arrival_time=t) for t, name in enumerate("abcd")]
    for req in requests:
        sched.add_request(req)
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    step_once(sched, executor, run)
    step = run.steps[-1]
    assert step.dropped_request_ids == ["d", "c"] and len(step.swap_out) == 2
    c, d = sched.get_request("c"), sched.get_request("d")
    assert c is not None and d is not None
    assert d.status == RequestStatus.SWAPPED and d.num_computed_tokens == 8
    assert c.status == RequestStatus.WAITING and c.num_computed_tokens == 0 and not c.swap_block_ids
    assert (sched.num_preemptions_total, sched.num_swap_outs_total) == (2, 1)
    run_to_completion(sched, executor, run)
    assert first_admissions(run, 2)[:2] == ["d", "c"]
    [c_resumed] = [r for s in run.steps[2:] for r in s.new_requests if r.request_id == "c"]
    assert c_resumed.num_computed_tokens == 0  # recomputed
    for req in requests:
        assert run.outputs[req.request_id] == reference_output(req, 4096)[0]


def test_without_a_swap_pool_swap_mode_recomputes() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, enable_prefix_caching=False, preemption_mode="swap")
    for t, name in enumerate("abc"):
        sched.add_request(make_request(name, prompt_len=8, max_tokens=10, arrival_time=t))
    run = run_to_completion(sched, FakeExecutor(4))
    assert sched.swap_pool is None and sched.num_preemptions_total >= 1 and sched.num_swap_outs_total == 0
    assert all(not step.swap_out and not step.swap_in for step in run.steps)


def test_recompute_mode_never_swaps() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, enable_prefix_caching=False, num_swap_blocks=8)
    for t, name in enumerate("abc"):
        sched.add_request(make_request(name, prompt_len=8, max_tokens=10, arrival_time=t))
    run = run_to_completion(sched, FakeExecutor(4))
    assert sched.num_preemptions_total >= 1 and sched.num_swap_outs_total == 0
    assert all(not step.swap_out and not step.swap_in for step in run.steps)


def test_abort_of_a_swapped_request_frees_its_swap_blocks() -> None:
    sched = make_scheduler(
        num_blocks=6, block_size=4, enable_prefix_caching=False, preemption_mode="swap", num_swap_blocks=8
    )
    for t, name in enumerate("abc"):
        sched.add_request(make_request(name, prompt_len=8, max_tokens=10, arrival_time=t))
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    step_once(sched, executor, run)
    assert sched.swap_pool is not None and sched.swap_pool.num_used_blocks == 2
    [delta] = sched.abort_requests(["c"])
    assert delta.finish_reason == "abort"
    assert sched.swap_pool.num_used_blocks == 0 and sched.num_swapped == 0
    step_once(sched, executor, run)
    assert "c" not in run.steps[-1].dropped_request_ids  # the executor forgot it at swap-out
    run_to_completion(sched, executor, run)
    executor.execute(sched.schedule())
    assert executor.mirrors == {}


def test_swap_with_prefix_caching_keeps_hashes_consistent() -> None:
    # Equal prompts share their cached blocks; swapped-out blocks stay cached and may be
    # reused or evicted while their owner is away; it comes back into fresh blocks that
    # are offered to the cache again. The fake KV cache checks every read.
    sched = make_scheduler(num_blocks=7, block_size=4, preemption_mode="swap", num_swap_blocks=16)
    requests = [make_request(name, prompt_len=9, max_tokens=12, arrival_time=t) for t, name in enumerate("abcd")]
    for req in requests:
        sched.add_request(req)
    run = run_to_completion(sched, FakeExecutor(4))
    assert sched.num_swap_outs_total >= 1
    for req in requests:
        assert run.outputs[req.request_id] == reference_output(req, 4096)[0]
    pool = sched.block_pool
    assert all(pool.cached_block(h) is None or pool.block_hash(pool.cached_block(h)) == h
               for req in requests for h in req.block_hashes)


def test_executor_loss_sends_swapped_requests_back_to_recompute() -> None:
    sched = make_scheduler(
        num_blocks=6, block_size=4, enable_prefix_caching=False, preemption_mode="swap", num_swap_blocks=8
    )
    requests = [make_request(name, prompt_len=8, max_tokens=10, arrival_time=t) for t, name in enumerate("abc")]
    for req in requests:
        sched.add_request(req)
    executor, run = FakeExecutor(4), Run()
    step_once(sched, executor, run)
    step_once(sched, executor, run)
    assert [r.request_id for r in sched.swapped] == ["c"]
    assert sorted(sched.requeue_all_running()) == ["a", "b", "c"]
    assert sched.num_swapped == 0 and sched.swap_pool is not None and sched.swap_pool.num_used_blocks == 0
    c = sched.get_request("c")
    assert c is not None and c.status == RequestStatus.WAITING and c.num_computed_tokens == 0
    # A new executor: nothing mirrored, empty swap pool and KV cache.
    run_to_completion(sched, FreshExecutor(block_size=4), run)
    for req in requests:
        assert run.outputs[req.request_id] == reference_output(req, 4096)[0]


def test_unknown_preemption_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown preemption mode 'evict'"):
        SchedulingLimits(max_model_len=64, preemption_mode="evict")  # type: ignore[arg-type]


def test_service_sizes_the_swap_pool_from_the_executor_and_shows_swapped_requests() -> None:
    context = zmq.Context()
    service = SchedulerService(
        SchedulerServiceConfig(
            gateway_address=f"tcp://127.0.0.1:{free_port()}",
            executor_address=f"tcp://127.0.0.1:{free_port()}",
            limits=SchedulingLimits(enable_prefix_caching=False, preemption_mode="swap"),
        ),
        context,
    )
    try:
        ready = ExecutorReady("ex-1", 6, 4, "fake", "cpu", 4096, 0, num_swap_blocks=8)
        service._on_executor_ready(ExecutorGroup.single(b"ex-1", ready, 0.0), 0.0)
        core = service.core
        assert core is not None and core.swap_pool is not None and core.swap_pool.num_blocks == 8
        assert core.config.limits.preemption_mode == "swap"
        for t, name in enumerate("abc"):
            core.add_request(make_request(name, prompt_len=8, max_tokens=10, arrival_time=t))
        executor, run = FakeExecutor(4), Run()
        step_once(core, executor, run)
        step_once(core, executor, run)
        snapshot = service.snapshot(1)
        assert [(r.request_id, r.status) for r in snapshot.swapped] == [("c", "swapped")]
        assert snapshot.block_pool is not None
        assert (snapshot.block_pool.num_swap_blocks, snapshot.block_pool.num_used_swap_blocks) == (8, 2)
        assert snapshot.block_pool.num_swap_outs == 1

        # A replacement executor with a smaller swap pool: a core sized for it takes over,
        # and the swapped request, whose K/V went with the old executor, recomputes.
        replacement = msgspec.structs.replace(ready, executor_id="ex-2", num_swap_blocks=2)
        service._on_executor_ready(ExecutorGroup.single(b"ex-2", replacement, 1.0), 1.0)
        core = service.core
        assert core is not None and core.swap_pool is not None and core.swap_pool.num_blocks == 2
        assert [r.request_id for r in core.waiting] == ["a", "b", "c"] and core.num_swapped == 0
        assert service.snapshot(2).swapped == []
    finally:
        service.close()
        context.term()


def test_swap_pairs_cross_the_wire_intact() -> None:
    step = ExecuteStep(
        step_id=3, new_requests=[], cached_requests=[], num_scheduled_tokens=[], swap_out=[(5, 0), (2, 1)], swap_in=[(3, 7)]
    )
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(StepMessage(step=step)), type=StepMessage).step
    assert (decoded.swap_out, decoded.swap_in) == ([(5, 0), (2, 1)], [(3, 7)])
    ready = ExecutorReady("ex", 6, 4, "fake", "cpu", 4096, 0, num_swap_blocks=9)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ready), type=ExecutorReady).num_swap_blocks == 9
