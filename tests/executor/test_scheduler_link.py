"""The executor's I/O thread against a real ROUTER socket standing in for the scheduler:
it announces itself on connecting, queues steps with their session, forwards results of
the current session only, and beats while connected."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq

from pagedserve.services.executor.scheduler_link import SchedulerLink
from pagedserve.services.launcher import free_port
from pagedserve.shared.messages import (
    ExecuteStep,
    ExecutorMessage,
    ExecutorReady,
    Heartbeat,
    SampledToken,
    StepMessage,
    StepResult,
    StepResultMessage,
)
from pagedserve.shared.transport import decode, encode

READY = ExecutorReady("executor-link", 64, 16, "test-model", "cpu", 512, 2)


class Scheduler:
    """The scheduler's end: a ROUTER that hands back what the link sent, in order."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.bind(address)
        self.decoder = msgspec.msgpack.Decoder(ExecutorMessage)
        self.identity = b""

    def receive(self, kinds: tuple[type, ...], timeout_s: float = 10.0) -> Any:
        """The next message of one of `kinds` (others, e.g. heartbeats, are passed over)."""
        deadline_ms = int(timeout_s * 1000)
        while self.socket.poll(deadline_ms):
            identity, *frames = self.socket.recv_multipart()
            self.identity = identity
            message = decode(frames, self.decoder, peer="link")
            if isinstance(message, kinds):
                return message
        raise AssertionError(f"no {kinds} within {timeout_s} s")

    def send(self, message: msgspec.Struct) -> None:
        self.socket.send_multipart([self.identity, *encode(message)])


@pytest.fixture
def linked() -> Iterator[tuple[SchedulerLink, Scheduler]]:
    context: zmq.Context[Any] = zmq.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = Scheduler(context, address)
    link = SchedulerLink(context, address, READY, heartbeat_interval_s=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=link.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield link, scheduler
    finally:
        stop.set()
        thread.join(timeout=5)
        link.close()
        scheduler.socket.close(linger=0)
        context.term()


def test_it_announces_itself_then_beats(linked: tuple[SchedulerLink, Scheduler]) -> None:
    link, scheduler = linked
    assert scheduler.receive((ExecutorReady,)) == READY
    assert link.session == 1
    assert scheduler.receive((Heartbeat,)).executor_id == "executor-link"


def test_steps_are_queued_with_their_session_and_only_current_results_go_back(
    linked: tuple[SchedulerLink, Scheduler],
) -> None:
    link, scheduler = linked
    scheduler.receive((ExecutorReady,))
    step = ExecuteStep(7, [], [], [])
    scheduler.send(StepMessage(step=step))
    session, queued = link.steps.get(timeout=10)
    assert (session, queued) == (1, step)
    # A result of an older session is dropped; the current one's arrives. Both travel the
    # same ordered path, so had the stale one gone out it would arrive first.
    link.send_result(session - 1, StepResult(6, [SampledToken("stale", 1)]))
    link.send_result(session, StepResult(7, [SampledToken("a", 42)]))
    result = scheduler.receive((StepResultMessage,)).result
    assert result == StepResult(7, [SampledToken("a", 42)])
