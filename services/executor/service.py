"""The executor process: a model runner behind a ZeroMQ DEALER socket.

Two threads. The I/O thread owns the socket: it forwards ExecuteSteps to the step loop,
sends results back and a heartbeat every `heartbeat_interval_s`, so the scheduler hears
from us even during a long prefill. The main thread only pops a step, runs it, pushes the
result (through an inproc socket that wakes the I/O thread): it does no network I/O.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid
from typing import Any

import msgspec
import zmq

from services.executor.model_runner import ModelRunner
from shared.config import EngineConfig
from shared.messages import ExecutorReady, Heartbeat, StepMessage, StepResultMessage
from shared.model_source import resolve_model_source
from shared.transport import decode, encode, make_socket

log = logging.getLogger("pagedserve.executor")


class ExecutorConfig(msgspec.Struct, forbid_unknown_fields=True):
    engine: EngineConfig
    scheduler_address: str = "tcp://127.0.0.1:5556"
    executor_id: str = ""
    heartbeat_interval_s: float = 1.0


_STOP = object()


def serve(config: ExecutorConfig, stop_event: threading.Event | None = None) -> None:
    executor_id = config.executor_id or f"executor-{uuid.uuid4().hex[:8]}"
    stop_event = stop_event or threading.Event()
    source = resolve_model_source(config.engine.model)
    runner = ModelRunner(config.engine, source)
    log.info(
        "%s: %s on %s, %d KV blocks of %d tokens", executor_id, source.name, runner.device,
        runner.num_blocks, runner.block_size,
    )
    ready = ExecutorReady(
        executor_id=executor_id,
        num_blocks=runner.num_blocks,
        block_size=runner.block_size,
        model=source.name,
        device=str(runner.device),
        max_model_len=runner.max_model_len,
        eos_token_id=runner.eos_token_id,
    )
    context = zmq.Context()
    results_endpoint = f"inproc://results-{executor_id}"
    results_in = make_socket(context, zmq.PAIR)
    results_in.bind(results_endpoint)
    steps: queue.Queue[Any] = queue.Queue()
    io_thread = threading.Thread(
        target=_io_loop,
        args=(context, config, executor_id, ready, results_endpoint, steps, stop_event),
        name="executor-io",
        daemon=True,
    )
    io_thread.start()
    try:
        while not stop_event.is_set():
            try:
                message = steps.get(timeout=0.2)
            except queue.Empty:
                continue
            if message is _STOP:
                break
            started = time.perf_counter()
            result = runner.execute(message.step)
            results_in.send_multipart(
                encode(StepResultMessage(result=result, forward_s=time.perf_counter() - started))
            )
    finally:
        stop_event.set()
        io_thread.join(timeout=5)
        results_in.close()
        context.term()


def _io_loop(
    context: zmq.Context[Any],
    config: ExecutorConfig,
    executor_id: str,
    ready: ExecutorReady,
    results_endpoint: str,
    steps: queue.Queue[Any],
    stop_event: threading.Event,
) -> None:
    scheduler = make_socket(context, zmq.DEALER, identity=executor_id.encode())
    scheduler.connect(config.scheduler_address)
    results_out = make_socket(context, zmq.PAIR)
    results_out.connect(results_endpoint)
    decoder = msgspec.msgpack.Decoder(StepMessage)
    poller = zmq.Poller()
    poller.register(scheduler, zmq.POLLIN)
    poller.register(results_out, zmq.POLLIN)
    scheduler.send_multipart(encode(ready))
    next_heartbeat = time.monotonic() + config.heartbeat_interval_s
    try:
        while not stop_event.is_set():
            timeout_ms = max(0, int((next_heartbeat - time.monotonic()) * 1000))
            events = dict(poller.poll(min(timeout_ms, 200)))
            if scheduler in events:
                message = decode(scheduler.recv_multipart(), decoder, peer="scheduler")
                if message is not None:
                    steps.put(message)
            if results_out in events:
                scheduler.send_multipart(results_out.recv_multipart())
            if time.monotonic() >= next_heartbeat:
                scheduler.send_multipart(encode(Heartbeat(executor_id=executor_id, sent_at=time.time())))
                next_heartbeat = time.monotonic() + config.heartbeat_interval_s
    finally:
        steps.put(_STOP)
        scheduler.close()
        results_out.close()


def install_signal_handlers(stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT end the step loop cleanly (the current step finishes first)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_event.set())
