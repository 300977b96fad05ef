"""The scheduler service (services/scheduler/service.py) losing its executor, over real
ZeroMQ sockets but with a fake executor (test_scheduler.py's, which "samples" a token that
depends on the whole sequence): no model, so each test takes a second or two.

Lost = silent for the heartbeat timeout. Running requests, the step in flight included,
go back to waiting with their blocks freed and resume in whichever executor announces
itself next, from the tokens already streamed; none returns in time: 503s."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq

from pagedserve.services.launcher import free_port
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.service import SchedulerService, SchedulerServiceConfig
from pagedserve.shared.messages import (
    AbortRequest,
    ExecutorReady,
    Heartbeat,
    InfoQuery,
    RequestDeltas,
    RequestError,
    SchedulerInfo,
    SchedulerToGateway,
    StatusQuery,
    StatusSnapshot,
    StepMessage,
    StepResultMessage,
    SubmitRequest,
)
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.transport import decode, encode
from tests.cluster import wait_until
from tests.scheduler.test_executor_loss import FreshExecutor
from tests.scheduler.test_parallel_sampling import EOS, ForkingExecutor, separate_outputs
from tests.scheduler.test_scheduler import model_token

BLOCK_SIZE = 4
MAX_TOKENS = 8
PROMPTS = {"a": [11, 12, 13, 14, 15], "b": list(range(20, 33))}
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def expected_output(request_id: str) -> list[int]:
    tokens = list(PROMPTS[request_id])
    for _ in range(MAX_TOKENS):
        tokens.append(model_token(request_id, tokens))
    return tokens[len(PROMPTS[request_id]):]


class Peer:
    """A DEALER socket speaking one side of the protocol."""

    def __init__(self, context: zmq.Context[Any], address: str, identity: bytes, decoder: Any) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(address)
        self.decoder = decoder

    def send(self, message: msgspec.Struct) -> None:
        self.sock.send_multipart(encode(message))

    def recv(self, timeout_s: float = 5.0) -> Any:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("nothing from the scheduler")
        return decode(self.sock.recv_multipart(), self.decoder)

    def close(self) -> None:
        self.sock.close()


class Executor(Peer):
    """A fake executor process: announces itself, runs steps with the fake model."""

    def __init__(self, context: zmq.Context[Any], address: str, name: str, num_blocks: int) -> None:
        super().__init__(context, address, name.encode(), msgspec.msgpack.Decoder(StepMessage))
        self.model = FreshExecutor(block_size=BLOCK_SIZE, token_fn=model_token)
        self.ready = ExecutorReady(name, num_blocks, BLOCK_SIZE, "fake-model", "cpu", 4096, None)
        self.send(self.ready)

    def heartbeat(self) -> None:
        self.send(Heartbeat(self.ready.executor_id, time.time()))

    def run_step(self) -> StepMessage:
        """Receive a step, answer it (and heartbeat, as the real one does meanwhile)."""
        message = self.recv()
        self.send(StepResultMessage(self.model.execute(message.step)))
        self.heartbeat()
        return message

    def take_step(self) -> StepMessage:
        """Receive a step and never answer it (the process dies with it)."""
        return self.recv()


class Gateway(Peer):
    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        super().__init__(context, address, b"gateway-test", msgspec.msgpack.Decoder(SchedulerToGateway))
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.errors: dict[str, RequestError] = {}
        # The same by (request id, sample index), for requests with n > 1 samples.
        self.sample_outputs: dict[tuple[str, int], list[int]] = {}
        self.sample_finished: dict[tuple[str, int], str] = {}
        self.requests_finished: list[str] = []  # by the flag on their last delta, in order

    def submit(self, request_id: str) -> None:
        self.send(SubmitRequest(request_id, PROMPTS[request_id], PARAMS, time.time()))

    def pump(self) -> None:
        """Take whatever the scheduler has sent so far."""
        while self.sock.poll(0):
            self._take(decode(self.sock.recv_multipart(), self.decoder))

    def pumped_until(self, condition: Callable[["Gateway"], bool]) -> bool:
        self.pump()
        return condition(self)

    def _take(self, message: Any) -> None:
        if isinstance(message, RequestDeltas):
            for delta in message.deltas:
                sample = (delta.request_id, delta.sample_index)
                assert sample not in self.sample_finished, f"a delta for {sample} after it finished"
                self.outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
                self.sample_outputs.setdefault(sample, []).extend(delta.new_token_ids)
                if delta.finish_reason:
                    self.finished[delta.request_id] = delta.finish_reason
                    self.sample_finished[sample] = delta.finish_reason
                if delta.request_finished:
                    assert delta.request_id not in self.requests_finished, f"{delta.request_id} finished twice"
                    self.requests_finished.append(delta.request_id)
        elif isinstance(message, RequestError):
            self.errors[message.request_id] = message

    def status(self) -> StatusSnapshot:
        """A fresh snapshot; deltas that arrive before it are taken, not lost."""
        self.send(StatusQuery(1))
        deadline = time.monotonic() + 5
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(message, StatusSnapshot):
                return message
            self._take(message)

    def info(self, request_ids: list[str]) -> SchedulerInfo:
        """A fresh info answer; deltas that arrive before it are taken, not lost."""
        self.send(InfoQuery(2, request_ids))
        deadline = time.monotonic() + 5
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(message, SchedulerInfo):
                return message
            self._take(message)


class Service:
    def __init__(self, **config: Any) -> None:
        self.context = zmq.Context()
        self.gateway_address = f"tcp://127.0.0.1:{free_port()}"
        self.executor_address = f"tcp://127.0.0.1:{free_port()}"
        self.service = SchedulerService(
            # Asynchronous scheduling on: every test here then also checks that steps sent
            # ahead of a result change nothing (outputs, executor loss, aborts, samples).
            SchedulerServiceConfig(
                self.gateway_address, self.executor_address, limits=SchedulingLimits(max_num_batched_tokens=8),
                async_scheduling=True, **config,
            ),
            self.context,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.service.run, args=(self.stop,), daemon=True)
        self.thread.start()
        self.gateway = Gateway(self.context, self.gateway_address)

    def executor(self, name: str, num_blocks: int = 64) -> Executor:
        return Executor(self.context, self.executor_address, name, num_blocks)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.gateway.close()
        self.service.close()
        self.context.destroy(linger=0)


@pytest.fixture()
def start_service() -> Iterator[Callable[..., Service]]:
    """Starts a scheduler service with the given timeouts; stopped after the test."""
    started: list[Service] = []

    def start(**config: Any) -> Service:
        started.append(Service(**config))
        return started[-1]

    yield start
    for service in started:
        service.close()


def executor_joined(service: Service, name: str) -> bool:
    return [e.executor_id for e in service.gateway.status().executors] == [name]


def all_blocks_free(snapshot: StatusSnapshot) -> bool:
    pool = snapshot.block_pool
    return pool is not None and pool.num_free_blocks == pool.num_blocks


def drive(service: Service, executor: Executor, until: Callable[[Gateway], bool], timeout_s: float = 10) -> list[StepMessage]:
    """Run the steps the scheduler sends until the gateway has seen what it waits for."""
    steps: list[StepMessage] = []
    deadline = time.monotonic() + timeout_s
    while not service.gateway.pumped_until(until):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway saw {service.gateway.outputs}, {service.gateway.finished}, {service.gateway.errors}")
        if executor.sock.poll(20):
            steps.append(executor.run_step())
    return steps


def start_two_requests(service: Service, executor: Executor, num_steps: int) -> None:
    wait_until(lambda: executor_joined(service, executor.ready.executor_id), 5, "the executor to join")
    service.gateway.submit("a")
    service.gateway.submit("b")
    for _ in range(num_steps):
        executor.run_step()


def test_a_lost_executors_requests_resume_in_its_replacement(start_service: Callable[..., Service]) -> None:
    service = start_service(heartbeat_timeout_s=0.5, executor_timeout_s=30)
    first = service.executor("first", num_blocks=64)
    start_two_requests(service, first, num_steps=4)  # "b" (13 tokens) prefills in chunks of 8
    in_flight = first.take_step()
    assert in_flight.step.cached_requests  # the step in flight continues running requests
    service.gateway.status()  # every delta sent before the step went out precedes its answer
    streamed = {i: list(tokens) for i, tokens in service.gateway.outputs.items()}
    assert streamed and all(0 < len(t) < MAX_TOKENS for t in streamed.values())
    first.close()  # dies: no result, no heartbeat

    def requeued() -> bool:
        snapshot = service.gateway.status()
        return snapshot.num_executors_lost == 1 and not snapshot.running
    # Lost by its heartbeat (0.5 s), not the 30 s executor timeout: the event's detail says
    # which (asserted below), so no wall-clock bound is needed.
    wait_until(requeued, 20, "the executor to be declared lost")
    snapshot = service.gateway.status()
    assert snapshot.executors == [] and {r.request_id for r in snapshot.waiting} == {"a", "b"}
    assert all(r.num_preemptions == 1 and not r.block_ids for r in snapshot.waiting)
    assert all_blocks_free(snapshot)
    assert snapshot.block_pool is not None and snapshot.block_pool.num_cached_blocks == 0  # they went with the cache
    assert [e.event for e in snapshot.executor_events] == ["joined", "lost"]
    assert snapshot.executor_events[-1].num_requeued == 2 and "heartbeat" in snapshot.executor_events[-1].detail

    second = service.executor("second", num_blocks=48)  # another capacity: the pool follows
    steps = drive(service, second, lambda g: len(g.finished) == 2)
    resumed_with = {new.request_id: new.token_ids for message in steps for new in message.step.new_requests}
    # Each recomputed its prompt + what was streamed, then went on: nothing lost, nothing twice.
    assert resumed_with == {i: PROMPTS[i] + streamed[i] for i in PROMPTS}
    assert service.gateway.outputs == {i: expected_output(i) for i in PROMPTS}
    assert service.gateway.errors == {}
    snapshot = service.gateway.status()
    assert snapshot.block_pool is not None and snapshot.block_pool.num_blocks == 48 and all_blocks_free(snapshot)
    assert [e.event for e in snapshot.executor_events] == ["joined", "lost", "joined"]


def test_no_executor_within_the_timeout_fails_requests_with_503(start_service: Callable[..., Service]) -> None:
    service = start_service(heartbeat_timeout_s=0.3, executor_timeout_s=0.8)
    first = service.executor("first")
    start_two_requests(service, first, num_steps=2)
    first.take_step()
    first.close()
    wait_until(lambda: service.gateway.pumped_until(lambda g: len(g.errors) == 2), 10, "503s for both requests")
    assert {e.status_code for e in service.gateway.errors.values()} == {503}
    assert "no executor" in service.gateway.errors["a"].message and service.gateway.errors["a"].retry_after_s > 0
    assert not service.gateway.finished
    snapshot = service.gateway.status()
    assert not snapshot.running and not snapshot.waiting and all_blocks_free(snapshot)

    service.gateway.errors.clear()
    service.gateway.submit("a")  # still no executor: refused at once
    wait_until(lambda: service.gateway.pumped_until(lambda g: "a" in g.errors), 5, "a 503 for a new request")
    assert service.gateway.errors["a"].status_code == 503

    service.gateway.errors.clear()
    late = service.executor("late")
    wait_until(lambda: executor_joined(service, "late"), 5, "the late executor to join")
    service.gateway.outputs.clear()
    service.gateway.submit("b")
    drive(service, late, lambda g: "b" in g.finished)
    assert service.gateway.outputs["b"] == expected_output("b") and not service.gateway.errors


def test_an_executor_that_was_only_slow_is_taken_back(start_service: Callable[..., Service]) -> None:
    service = start_service(heartbeat_timeout_s=0.3, executor_timeout_s=30)
    executor = service.executor("slow")
    start_two_requests(service, executor, num_steps=3)
    stalled = executor.take_step()  # busy (say, a huge prefill) and silent past the timeout
    wait_until(lambda: service.gateway.status().num_executors_lost == 1, 5, "the executor to be declared lost")
    # Its late result is dropped; its heartbeat gets it taken back, from scratch.
    executor.send(StepResultMessage(executor.model.execute(stalled.step)))
    executor.heartbeat()
    resumed = executor.run_step()
    while not resumed.step.dropped_request_ids:  # a step sent ahead of the stalled one (async)
        resumed = executor.run_step()
    assert set(resumed.step.dropped_request_ids) == {"a", "b"}  # forget the old mirrors...
    assert resumed.step.new_requests and not resumed.step.cached_requests  # ...and recompute
    drive(service, executor, lambda g: len(g.finished) == 2)
    assert service.gateway.outputs == {i: expected_output(i) for i in PROMPTS}
    assert all_blocks_free(service.gateway.status())


def test_n_samples_stream_under_the_request_id_until_the_last_one_finishes(start_service: Callable[..., Service]) -> None:
    service = start_service()
    executor = service.executor("forking")
    executor.model = ForkingExecutor(BLOCK_SIZE)  # token = f(seed, sequence); runs the forks
    wait_until(lambda: executor_joined(service, "forking"), 5, "the executor to join")
    gateway = service.gateway
    prompt = PROMPTS["b"]
    params = SamplingParams(max_tokens=MAX_TOKENS, seed=5, ignore_eos=True, n=3)
    separate = separate_outputs(Request("x", prompt, params, arrival_time=0.0, eos_token_id=EOS), BLOCK_SIZE)
    # Sample 1 stops early on a token the others never sample: they go on after it finished.
    stop_token = separate[1][2]
    assert all(stop_token not in separate[i] for i in (0, 2))
    stopping = msgspec.structs.replace(params, stop_token_ids=[stop_token])
    gateway.send(SubmitRequest("g", prompt, stopping, time.time()))
    drive(service, executor, lambda g: len(g.sample_finished) == 3)
    assert gateway.sample_outputs == {("g", 0): separate[0], ("g", 1): separate[1][:3], ("g", 2): separate[2]}
    assert gateway.sample_finished == {("g", 0): "length", ("g", 1): "stop", ("g", 2): "length"}
    assert gateway.requests_finished == ["g"]  # flagged once, on the last sample's last delta
    assert service.service.owner_of == {} and all_blocks_free(gateway.status())

    # An abort of the request aborts every sample.
    gateway.send(SubmitRequest("h", prompt, params, time.time()))
    drive(service, executor, lambda g: len(g.sample_outputs.get(("h", 2), [])) >= 2)
    gateway.send(AbortRequest(["h"]))
    drive(service, executor, lambda g: all(("h", i) in g.sample_finished for i in range(3)))
    assert {gateway.sample_finished[("h", i)] for i in range(3)} == {"abort"}
    assert gateway.requests_finished == ["g", "h"]
    assert service.service.owner_of == {} and all_blocks_free(gateway.status())

    # Aborted before its prompt was computed: no sample was forked, none will report.
    gateway.send(SubmitRequest("k", prompt, params, time.time()))
    gateway.send(AbortRequest(["k"]))
    drive(service, executor, lambda g: ("k", 0) in g.sample_finished)
    assert gateway.requests_finished == ["g", "h", "k"]  # its one "abort" delta ends it
    snapshot = gateway.status()
    assert not snapshot.running and not snapshot.waiting and all_blocks_free(snapshot)
    assert service.service.owner_of == {}


def test_an_info_query_answers_counts_and_which_requests_are_held(start_service: Callable[..., Service]) -> None:
    service = start_service(replica_id="replica-info")
    gateway = service.gateway
    before = gateway.info(["a"])
    assert (before.model, before.max_model_len, before.num_blocks, before.num_executors_alive) == ("", 0, 0, 0)
    assert before.replica_id == "replica-info" and before.held_request_ids == []
    executor = service.executor("informed", num_blocks=64)
    start_two_requests(service, executor, num_steps=2)
    info = gateway.info(["a", "unknown", "b"])
    assert info.held_request_ids == ["a", "b"]
    assert (info.model, info.max_model_len, info.num_executors_alive) == ("fake-model", 4096, 1)
    assert info.num_running + info.num_waiting == 2 and info.num_swapped == 0
    assert info.num_blocks == 64 and info.num_used_blocks > 0 and info.num_free_blocks == 64 - info.num_used_blocks
    assert 0 < info.kv_utilisation <= 1 and info.steps.num_steps == 2
    drive(service, executor, lambda g: g.requests_finished == ["a", "b"] or g.requests_finished == ["b", "a"])
    after = gateway.info(["a", "b"])
    assert after.held_request_ids == [] and after.num_running == after.num_waiting == 0
    assert after.num_used_blocks == 0 and after.kv_utilisation == 0.0
