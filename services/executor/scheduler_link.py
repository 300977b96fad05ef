"""The executor's end of its link to the scheduler: the I/O thread that owns the DEALER
socket, and what the step loop sees of it (a queue of steps, the current session, a way to
send a result back).

Every (re)connection to a scheduler is a new *session*, announced with ExecutorReady: the
scheduler at the other end may be a new process (restarted) that knows nothing of the
requests we mirror, and one that lost us requeued them all anyway. Steps are queued with
the session they came in, and a result goes out only if its session is still the current
one. The I/O thread also sends a heartbeat every `heartbeat_interval_s`, so the scheduler
hears from us even during a long prefill.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from pagedserve.shared.messages import ExecuteStep, ExecutorReady, Heartbeat, StepMessage, StepResult, StepResultMessage
from pagedserve.shared.transport import decode, encode, make_socket
from pagedserve.shared.zmq_security import CurveEndpoint

log = logging.getLogger(__name__)

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class SchedulerLink:
    """Built on the step loop's thread, which then calls `run` on a thread of its own.

    The step loop pops `(session, step)` from `steps`, runs only the steps of the current
    `session` (an int the I/O thread advances on each connection; assigning one is atomic:
    no lock), and pushes results with `send_result`, through an inproc socket that wakes
    the I/O thread: the step loop itself does no network I/O."""

    def __init__(
        self,
        context: zmq.Context[Any],
        scheduler_address: str,
        ready: ExecutorReady,
        heartbeat_interval_s: float,
        curve: CurveEndpoint | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.ready = ready
        self.heartbeat_interval_s = heartbeat_interval_s
        self.steps: queue.Queue[tuple[int, ExecuteStep]] = queue.Queue()
        self.session = 0  # 0: never connected yet
        self._context = context
        self._curve = curve
        self._results_endpoint = f"inproc://results-{ready.executor_id}"
        self._results_in = make_socket(context, zmq.PAIR)  # the step loop's end
        self._results_in.bind(self._results_endpoint)

    def send_result(self, session: int, result: StepResult) -> None:
        """From the step loop: the I/O thread sends it on if `session` is still current."""
        self._results_in.send_multipart([session.to_bytes(8, "little"), *encode(StepResultMessage(result=result))])

    def close(self) -> None:
        """From the step loop, once `run` has returned."""
        self._results_in.close()

    def run(self, stop_event: threading.Event) -> None:
        """The I/O thread, until `stop_event` is set; sets it on the way out (so that the
        step loop ends with it, whatever ended this one)."""
        executor_id = self.ready.executor_id
        scheduler = make_socket(self._context, zmq.DEALER, identity=executor_id.encode(), curve=self._curve)
        # Connections come and go (a scheduler restarts): the monitor says when, so that each
        # new one is announced with ExecutorReady, which is how a scheduler learns of us.
        monitor = scheduler.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED
        )
        scheduler.connect(self.scheduler_address)
        results_out = make_socket(self._context, zmq.PAIR)
        results_out.connect(self._results_endpoint)
        decoder = msgspec.msgpack.Decoder(StepMessage)
        poller = zmq.Poller()
        for socket in (scheduler, results_out, monitor):
            poller.register(socket, zmq.POLLIN)
        connected = False
        handshake_failure_logged = False
        next_heartbeat = time.monotonic()
        try:
            while not stop_event.is_set():
                timeout_ms = max(0, int((next_heartbeat - time.monotonic()) * 1000)) if connected else 200
                events = dict(poller.poll(min(timeout_ms, 200)))
                if monitor in events:
                    event = recv_monitor_message(monitor)["event"]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        self.session += 1
                        connected, handshake_failure_logged = True, False
                        _send(scheduler, encode(self.ready))
                        next_heartbeat = time.monotonic() + self.heartbeat_interval_s
                        log.info("%s: connected to the scheduler at %s, announced %d KV blocks",
                                 executor_id, self.scheduler_address, self.ready.num_blocks)
                    elif event == zmq.EVENT_DISCONNECTED:
                        connected = False
                        log.warning("%s: lost the scheduler at %s: reconnecting", executor_id, self.scheduler_address)
                    elif not handshake_failure_logged:
                        handshake_failure_logged = True
                        log.error("%s: handshake with %s failed (wrong CURVE keys, or not a pagedserve scheduler?): "
                                  "retrying", executor_id, self.scheduler_address)
                if scheduler in events:
                    message = decode(scheduler.recv_multipart(), decoder, peer="scheduler")
                    if message is not None:
                        self.steps.put((self.session, message.step))
                if results_out in events:
                    session_frame, *frames = results_out.recv_multipart()
                    if int.from_bytes(session_frame, "little") == self.session:
                        _send(scheduler, frames)
                if connected and time.monotonic() >= next_heartbeat:
                    _send(scheduler, encode(Heartbeat(executor_id=executor_id, sent_at=time.time())))
                    next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        finally:
            stop_event.set()
            scheduler.disable_monitor()
            monitor.close()
            scheduler.close()
            results_out.close()


def _send(scheduler: zmq.Socket[Any], frames: list[bytes]) -> None:
    """Never block the I/O thread: with the scheduler gone long enough for the queue to fill,
    a message is dropped (the scheduler that comes back starts a new session anyway)."""
    try:
        scheduler.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        log.warning("dropped a message for the scheduler: its send queue is full")
