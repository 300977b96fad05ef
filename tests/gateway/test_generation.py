"""Generation (one HTTP request's choices at the scheduler) against a stub scheduler
client: ordering of bursts, the stall check, the request timeout, and aborts on close."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.config import GatewayConfig
from pagedserve.services.gateway.context import GatewayContext
from pagedserve.services.gateway.detokenizer import TokenTexts
from pagedserve.services.gateway.errors import GatewayError
from pagedserve.services.gateway.generation import Generation
from pagedserve.services.gateway.metrics import GatewayMetrics
from pagedserve.services.gateway.replica_registry import Replica, RouteResult
from pagedserve.services.gateway.request_records import RequestRecorder
from pagedserve.services.gateway.router import RoutingDecision
from pagedserve.services.gateway.scheduler_client import RequestEvent
from pagedserve.shared.messages import RequestDelta, SchedulerInfo, StepStats, SubmitRequest
from pagedserve.shared.sampling_params import SamplingParams

class StubScheduler:
    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[RequestEvent]] = {}
        self.submitted: list[SubmitRequest] = []
        self.aborted: list[str] = []
        self.aborted_samples: list[tuple[str, list[int]]] = []
        self.holding: list[str] | None = None  # what its info answers say it holds; None: no answer
        self.info_questions: list[list[str]] = []  # the request ids each info query asked about
        self.latest_info: SchedulerInfo | None = None

    def register(self, request_ids: list[str], queue: asyncio.Queue[RequestEvent]) -> None:
        self.queues.update({request_id: queue for request_id in request_ids})

    def unregister(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.queues.pop(request_id, None)

    async def submit(self, requests: list[SubmitRequest]) -> None:
        self.submitted += requests

    def abort_soon(self, request_ids: list[str]) -> None:
        self.aborted += request_ids

    def abort_samples_soon(self, request_id: str, sample_indices: list[int]) -> None:
        self.aborted_samples.append((request_id, sample_indices))

    async def info(self, timeout_s: float = 1.0, max_age_s: float = 0.0, request_ids: list[str] | None = None) -> SchedulerInfo | None:
        self.info_questions.append(list(request_ids or []))
        if self.holding is None:
            return None
        held = [r for r in request_ids or [] if r in self.holding]
        return SchedulerInfo(1, "replica-stub", "m", 256, 1, len(self.holding), 0, 0, 8, 0, 8, 0.0, StepStats(0, 0.0, 0.0, 0.0, 0), held)


class StubReplicas:
    """The replica registry with the stub as its only replica."""

    def __init__(self, stub: StubScheduler) -> None:
        self.replica = Replica("stub", stub)  # type: ignore[arg-type]

    async def route(self, prompt: list[int], exclude: Any = (), cache_salt: str | None = None) -> RouteResult | None:
        return RouteResult(self.replica, RoutingDecision("stub", 0, "least_loaded"))

    def all(self) -> list[Replica]:
        return [self.replica]

    def request_ended(self, replica: Replica, block_hashes: list[bytes]) -> None:
        pass


def run(tokenizer: PreTrainedTokenizerBase, body: Any, n: int = 1, stop: list[str] | None = None, **config: Any) -> Any:
    """Run `body(generation, stub)` in a fresh event loop."""
    stub = StubScheduler()

    async def main() -> Any:
        context = GatewayContext(
            config=msgspec.structs.replace(GatewayConfig(gateway_id="test"), **config),
            tokenizer=tokenizer,
            model_name="m",
            replicas=StubReplicas(stub),  # type: ignore[arg-type]
            metrics=GatewayMetrics("m"),
            records=RequestRecorder(None),
            token_texts=TokenTexts(tokenizer),
            vocab_size=len(tokenizer),
        )
        generation = Generation(context, "req", [[1, 2, 3]], SamplingParams(max_tokens=50), n=n, stop=stop or [])
        await generation.submit()
        try:
            return await body(generation, stub)
        finally:
            generation.close()

    return asyncio.run(main()), stub


def test_a_burst_of_deltas_keeps_its_order(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "你好世界 🎉🚀 and more words"
    token_ids = tokenizer(text).input_ids

    async def body(generation: Generation, stub: StubScheduler) -> str:
        async def feed() -> None:
            await asyncio.sleep(0.01)  # let run_to_end block on the empty queue first
            for i, token_id in enumerate(token_ids):  # all at once, as one RequestDeltas batch would
                last = i == len(token_ids) - 1
                stub.queues["req-0"].put_nowait(RequestDelta("req-0", [token_id], finish_reason="stop" if last else None, request_finished=last))

        feeder = asyncio.create_task(feed())
        (result,) = await generation.run_to_end()
        await feeder
        return result.text

    result, stub = run(tokenizer, body)
    assert result == text
    assert stub.aborted == []  # finished normally: nothing to abort


def test_queued_steps_merge_into_one_delta_per_choice(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("one two three").input_ids

    async def body(generation: Generation, stub: StubScheduler) -> list:
        for token_id in token_ids:
            stub.queues["req-0"].put_nowait(RequestDelta("req-0", [token_id]))
        return await generation.next_deltas()

    (delta,), _ = run(tokenizer, body)
    assert (delta.index, delta.text, delta.token_ids, delta.finish_reason) == (0, "one two three", token_ids, None)


def test_a_silent_request_still_held_keeps_waiting_then_times_out(tokenizer: PreTrainedTokenizerBase) -> None:
    async def body(generation: Generation, stub: StubScheduler) -> None:
        stub.holding = ["req-0"]
        (delta,) = await generation.next_deltas()
        assert (delta.index, delta.text, delta.finish_reason) == (0, "", "abort")
        assert generation.timed_out and generation.finished
        assert stub.aborted == ["req-0"]  # at the deadline, not only when the handler closes
        error = generation.timeout_error()
        assert (error.status_code, error.code) == (504, "timeout") and "0.2 s" in error.message

    _, stub = run(tokenizer, body, stall_timeout_s=0.02, request_timeout_s=0.2)
    assert stub.aborted == ["req-0"]  # close() does not abort twice
    assert stub.info_questions and all(asked == ["req-0"] for asked in stub.info_questions)  # the stall checks


def test_the_deadline_keeps_what_was_generated(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("partial answer").input_ids

    async def body(generation: Generation, stub: StubScheduler) -> Any:
        stub.holding = ["req-0"]
        stub.queues["req-0"].put_nowait(RequestDelta("req-0", token_ids))
        return await generation.run_to_end(), generation

    ((result,), generation), stub = run(tokenizer, body, stall_timeout_s=0.05, request_timeout_s=0.3)
    assert (result.text, result.token_ids, result.finish_reason) == ("partial answer", token_ids, "abort")
    assert generation.timed_out and f"after {len(token_ids)} generated" in generation.timeout_error().message
    assert generation.usage().completion_tokens == len(token_ids)
    assert stub.aborted == ["req-0"]


@pytest.mark.parametrize("held", [False, True])
def test_a_lost_request_or_a_silent_scheduler_is_503(tokenizer: PreTrainedTokenizerBase, held: bool) -> None:
    async def body(generation: Generation, stub: StubScheduler) -> None:
        stub.holding = ["someone-else"] if held else None
        with pytest.raises(GatewayError) as error:
            await generation.next_deltas()
        assert error.value.status_code == 503

    _, stub = run(tokenizer, body, stall_timeout_s=0.02)
    assert stub.aborted == ["req-0"]


def test_closing_early_aborts_and_late_deltas_are_ignored(tokenizer: PreTrainedTokenizerBase) -> None:
    async def body(generation: Generation, stub: StubScheduler) -> None:
        queue = stub.queues["req-0"]
        queue.put_nowait(RequestDelta("req-0", tokenizer("hi").input_ids))
        (delta,) = await generation.next_deltas()
        assert delta.text == "hi" and delta.finish_reason is None
        generation.close()
        assert "req-0" not in stub.queues

    _, stub = run(tokenizer, body)
    assert stub.aborted == ["req-0"]


def test_the_flagged_last_delta_ends_the_request_and_every_unreported_sample(tokenizer: PreTrainedTokenizerBase) -> None:
    """An abort before the samples were forked: the scheduler sends one delta, sample 0's,
    flagged as the request's last; the other samples end with it, and nothing is aborted
    (the scheduler is done with the request)."""

    async def body(generation: Generation, stub: StubScheduler) -> Any:
        stub.queues["req-0"].put_nowait(RequestDelta("req-0", [], finish_reason="abort", sample_index=0, request_finished=True))
        return await generation.next_deltas(), generation

    (deltas, generation), stub = run(tokenizer, body, n=3)
    assert [(d.index, d.finish_reason) for d in deltas] == [(0, "abort"), (1, "abort"), (2, "abort")]
    assert generation.finished and stub.aborted == [] and "req-0" not in stub.queues


def test_choices_ended_by_the_gateway_abort_at_the_scheduler_unless_it_flagged_the_end(tokenizer: PreTrainedTokenizerBase) -> None:
    stop_ids, rest_ids = tokenizer("one ###").input_ids, tokenizer(" two").input_ids

    async def body(generation: Generation, stub: StubScheduler) -> Any:
        queue = stub.queues["req-0"]
        # Sample 1 finishes at the scheduler (not the request's end: sample 0 runs on);
        # sample 0 meets the stop string, which only the gateway sees.
        queue.put_nowait(RequestDelta("req-0", rest_ids, finish_reason="length", sample_index=1))
        queue.put_nowait(RequestDelta("req-0", stop_ids, sample_index=0))
        return await generation.run_to_end()

    results, stub = run(tokenizer, body, n=2, stop=["###"])
    assert [(r.text, r.finish_reason) for r in results] == [("one ", "stop"), (" two", "length")]
    assert stub.aborted == ["req-0"]  # the scheduler still ran sample 0: told to stop, once
    assert stub.aborted_samples == []  # its sibling had ended: the whole request is aborted

    async def sibling_runs_on(generation: Generation, stub: StubScheduler) -> Any:
        queue = stub.queues["req-0"]
        # Sample 0 meets the stop string while sample 1 still runs: sample 0 alone is
        # aborted at the scheduler (its blocks freed now), sample 1 goes on to its end.
        queue.put_nowait(RequestDelta("req-0", stop_ids, sample_index=0))
        (first,) = await generation.next_deltas()
        assert (first.index, first.finish_reason) == (0, "stop")
        assert stub.aborted_samples == [("req-0", [0])] and stub.aborted == []
        queue.put_nowait(RequestDelta("req-0", [], finish_reason="abort", sample_index=0))  # its answer: ignored
        queue.put_nowait(RequestDelta("req-0", rest_ids, finish_reason="length", sample_index=1, request_finished=True))
        return await generation.run_to_end()

    results, stub = run(tokenizer, sibling_runs_on, n=2, stop=["###"])
    assert [(r.finish_reason) for r in results] == ["stop", "length"] and results[1].text == " two"
    assert stub.aborted == [] and stub.aborted_samples == [("req-0", [0])]

    async def flagged(generation: Generation, stub: StubScheduler) -> Any:
        queue = stub.queues["req-0"]
        queue.put_nowait(RequestDelta("req-0", rest_ids, finish_reason="length", sample_index=1))
        # The scheduler ends sample 0 in the same step as the gateway's stop string.
        queue.put_nowait(RequestDelta("req-0", stop_ids, finish_reason="stop", sample_index=0, request_finished=True))
        return await generation.run_to_end()

    results, stub = run(tokenizer, flagged, n=2, stop=["###"])
    assert [(r.text, r.finish_reason) for r in results] == [("one ", "stop"), (" two", "length")]
    assert stub.aborted == []  # done at the scheduler: nothing to abort
