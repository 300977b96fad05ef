"""`Scheduler.requeue_all_running`: what the scheduler core does when its executor's KV
cache is gone (the executor died, or a new one replaced it), driven by the fake executor
of test_scheduler.py. Requests resume in a fresh executor exactly where they were: every
token already streamed is kept and none is sent twice."""

from __future__ import annotations

import msgspec

from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import ExecuteStep, StepResult
from tests.scheduler.test_scheduler import (
    FakeExecutor,
    Run,
    assert_all_free,
    check_pool,
    make_request,
    make_scheduler,
    record,
    reference_output,
    run_to_completion,
    step_once,
)


class FreshExecutor(FakeExecutor):
    """A replacement executor: it never saw the requests the scheduler tells it to forget."""

    def execute(self, step: ExecuteStep) -> StepResult:
        known = [i for i in step.dropped_request_ids if i in self.mirrors]
        return super().execute(msgspec.structs.replace(step, dropped_request_ids=known))


def test_running_requests_resume_in_a_new_executor_without_losing_or_repeating_tokens() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    requests = [make_request(f"r{i}", prompt_len=6 + 5 * i, max_tokens=12, arrival_time=float(i), ignore_eos=True) for i in range(4)]
    late = make_request("late", prompt_len=40, max_tokens=4, arrival_time=9.0, ignore_eos=True)
    expected = {r.request_id: reference_output(r, sched.config.max_model_len)[0] for r in [*requests, late]}
    for req in requests:
        sched.add_request(req)
    executor, run = FakeExecutor(block_size=4), Run()
    for _ in range(5):
        step_once(sched, executor, run)
    sched.add_request(late)
    step_once(sched, executor, run)  # "late" starts a chunked prefill
    assert 0 < late.num_computed_tokens < late.num_prompt_tokens
    sched.schedule()  # in flight when the executor dies: its result never comes
    running = [r.request_id for r in sched.running]
    outputs_before = {r.request_id: list(r.output_token_ids) for r in sched.running}

    assert sched.requeue_all_running() == running
    assert sched.num_running == 0 and sched.block_pool.num_free_blocks == sched.block_pool.num_blocks
    check_pool(sched)
    # Requeued like preempted requests: ahead of anyone never admitted, in arrival order,
    # their generated tokens kept for the recompute.
    assert [r.request_id for r in sched.waiting][: len(running)] == sorted(running, key=lambda i: sched.get_request(i).arrival_time)  # type: ignore[union-attr]
    assert all(sched.get_request(i).output_token_ids == outputs_before[i] for i in running)  # type: ignore[union-attr]

    run_to_completion(sched, FreshExecutor(block_size=4), run)
    assert run.outputs == expected
    assert set(run.finish_reasons.values()) == {"length"}


def test_a_request_waiting_for_an_executor_can_still_be_aborted() -> None:
    sched = make_scheduler(num_blocks=32, block_size=4)
    sched.add_request(make_request("a", max_tokens=8))
    step_once(sched, FakeExecutor(block_size=4), Run())
    sched.requeue_all_running()
    assert [d.finish_reason for d in sched.abort_requests(["a"])] == ["abort"]
    assert_all_free(sched)


def test_cached_prefixes_are_forgotten_with_the_lost_cache() -> None:
    sched = make_scheduler(num_blocks=32, block_size=4)
    executor = FakeExecutor(block_size=4)
    sched.add_request(make_request("alpha", prompt_len=17, max_tokens=2))
    run_to_completion(sched, executor)
    assert sched.block_pool.num_cached_blocks > 0  # its full blocks stay cached

    sched.requeue_all_running()
    assert sched.block_pool.num_cached_blocks == 0
    sched.add_request(make_request("omega", prompt_len=17, max_tokens=2))  # the same prompt tokens
    step = sched.schedule()
    assert step.new_requests[0].num_computed_tokens == 0  # a miss: the new executor holds nothing
    run = Run()
    record(run, sched.update_from_output(step, FreshExecutor(block_size=4).execute(step)))
    assert_pool_consistent(sched)


def assert_pool_consistent(sched: Scheduler) -> None:
    check_pool(sched)
    pool = sched.block_pool
    assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
