"""The executor process: a model runner behind a ZeroMQ DEALER socket.

Two threads. The I/O thread owns the socket: it forwards ExecuteSteps to the step loop,
sends results back and a heartbeat every `heartbeat_interval_s`, so the scheduler hears
from us even during a long prefill. The main thread only pops a step, runs it, pushes the
result (through an inproc socket that wakes the I/O thread): it does no network I/O.

Every (re)connection to a scheduler is a new *session*, announced with ExecutorReady: the
scheduler at the other end may be a new process (restarted) that knows nothing of the
requests we mirror, and one that lost us requeued them all anyway. So a session starts
from an empty request mirror, and steps and results of an older session are dropped.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from services.executor.model_runner import ModelRunner
from services.executor.config import EngineConfig
from shared.messages import ExecuteStep, ExecutorReady, Heartbeat, StepMessage, StepResultMessage
from shared.model_source import resolve_model_source
from shared.transport import decode, encode, make_socket
from shared.zmq_security import CurveEndpoint, curve_client

log = logging.getLogger("pagedserve.executor")


class ExecutorConfig(msgspec.Struct, forbid_unknown_fields=True):
    engine: EngineConfig
    scheduler_address: str = "tcp://127.0.0.1:5556"
    executor_id: str = ""
    heartbeat_interval_s: float = 1.0
    curve_keys_dir: str | None = None  # CURVE-secure the link to the scheduler (shared/zmq_security.py)


_STOP = object()

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass
class _Sessions:
    """The current session: advanced by the I/O thread on each connection, read by the
    step loop (an int assignment is atomic: no lock)."""

    current: int = 0


def serve(config: ExecutorConfig, stop_event: threading.Event | None = None) -> None:
    executor_id = config.executor_id or f"executor-{uuid.uuid4().hex[:8]}"
    stop_event = stop_event or threading.Event()
    # Before loading the model: a missing key file should fail in milliseconds, not minutes.
    curve = curve_client(config.curve_keys_dir) if config.curve_keys_dir else None
    source = resolve_model_source(config.engine.model)
    runner = ModelRunner(config.engine, source)
    log.info(
        "%s: %s on %s, %d KV blocks of %d tokens, %d CPU swap blocks", executor_id, source.name, runner.device,
        runner.num_blocks, runner.block_size, runner.num_swap_blocks,
    )
    ready = ExecutorReady(
        executor_id=executor_id,
        num_blocks=runner.num_blocks,
        block_size=runner.block_size,
        model=source.name,
        device=str(runner.device),
        max_model_len=runner.max_model_len,
        eos_token_id=runner.eos_token_id,
        num_swap_blocks=runner.num_swap_blocks,
    )
    context = zmq.Context()
    results_endpoint = f"inproc://results-{executor_id}"
    results_in = make_socket(context, zmq.PAIR)
    results_in.bind(results_endpoint)
    steps: queue.Queue[Any] = queue.Queue()  # (session, StepMessage), or _STOP
    sessions = _Sessions()
    io_thread = threading.Thread(
        target=_io_loop,
        args=(context, config, executor_id, ready, results_endpoint, steps, sessions, stop_event, curve),
        name="executor-io",
        daemon=True,
    )
    io_thread.start()
    mirrored_session = 0  # the session whose requests the runner mirrors
    try:
        while not stop_event.is_set():
            try:
                item = steps.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is _STOP:
                break
            session, message = item
            if session != sessions.current:
                continue  # from a scheduler we are no longer connected to: it requeued it
            if session != mirrored_session:
                _forget_all_requests(runner)
                mirrored_session = session
            started = time.perf_counter()
            result = runner.execute(message.step)
            results_in.send_multipart([
                session.to_bytes(8, "little"),
                *encode(StepResultMessage(result=result, forward_s=time.perf_counter() - started)),
            ])
    finally:
        stop_event.set()
        io_thread.join(timeout=5)
        results_in.close()
        context.term()


def _forget_all_requests(runner: ModelRunner) -> None:
    """Drop the request mirror of a previous session: its scheduler will never finish those
    requests (a new scheduler sends each request afresh, as a NewRequestData)."""
    if runner.requests:
        runner.execute(ExecuteStep(
            step_id=-1, new_requests=[], cached_requests=[], num_scheduled_tokens=[],
            dropped_request_ids=list(runner.requests),
        ))


def _io_loop(
    context: zmq.Context[Any],
    config: ExecutorConfig,
    executor_id: str,
    ready: ExecutorReady,
    results_endpoint: str,
    steps: queue.Queue[Any],
    sessions: _Sessions,
    stop_event: threading.Event,
    curve: CurveEndpoint | None = None,
) -> None:
    scheduler = make_socket(context, zmq.DEALER, identity=executor_id.encode(), curve=curve)
    # Connections come and go (a scheduler restarts): the monitor says when, so that each
    # new one is announced with ExecutorReady, which is how a scheduler learns of us.
    monitor = scheduler.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)
    scheduler.connect(config.scheduler_address)
    results_out = make_socket(context, zmq.PAIR)
    results_out.connect(results_endpoint)
    decoder = msgspec.msgpack.Decoder(StepMessage)
    poller = zmq.Poller()
    poller.register(scheduler, zmq.POLLIN)
    poller.register(results_out, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    connected = False
    handshake_failure_logged = False
    next_heartbeat = time.monotonic()
    try:
        while not stop_event.is_set():
            timeout_ms = max(0, int((next_heartbeat - time.monotonic()) * 1000)) if connected else 200
            events = dict(poller.poll(min(timeout_ms, 200)))
            if monitor in events:
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    sessions.current += 1
                    connected, handshake_failure_logged = True, False
                    _send(scheduler, encode(ready))
                    next_heartbeat = time.monotonic() + config.heartbeat_interval_s
                    log.info("%s: connected to the scheduler at %s, announced %d KV blocks",
                             executor_id, config.scheduler_address, ready.num_blocks)
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    connected = False
                    log.warning("%s: lost the scheduler at %s: reconnecting", executor_id, config.scheduler_address)
                elif not handshake_failure_logged:
                    handshake_failure_logged = True
                    log.error("%s: handshake with %s failed (wrong CURVE keys, or not a pagedserve scheduler?): retrying",
                              executor_id, config.scheduler_address)
            if scheduler in events:
                message = decode(scheduler.recv_multipart(), decoder, peer="scheduler")
                if message is not None:
                    steps.put((sessions.current, message))
            if results_out in events:
                session_frame, *frames = results_out.recv_multipart()
                if int.from_bytes(session_frame, "little") == sessions.current:
                    _send(scheduler, frames)
            if connected and time.monotonic() >= next_heartbeat:
                _send(scheduler, encode(Heartbeat(executor_id=executor_id, sent_at=time.time())))
                next_heartbeat = time.monotonic() + config.heartbeat_interval_s
    finally:
        steps.put(_STOP)
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


def install_signal_handlers(stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT end the step loop cleanly (the current step finishes first)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_event.set())
