"""The executor process: a model runner behind a ZeroMQ DEALER socket.

Two threads. The I/O thread (`scheduler_link.py`) owns the socket: it forwards
ExecuteSteps to the step loop, sends results back and heartbeats. The main thread only
pops a step, runs it, pushes the result: it does no network I/O.

Every (re)connection to a scheduler is a new session (see `scheduler_link.py`); the step
loop starts each one from an empty request mirror, since that scheduler sends every
request afresh, and drops the steps of older sessions (their scheduler requeued them).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import uuid

import zmq

from services.executor.config import ExecutorConfig
from services.executor.model_runner import ModelRunner
from services.executor.scheduler_link import SchedulerLink
from shared.messages import ExecutorReady
from shared.model_source import resolve_model_source
from shared.zmq_security import curve_client

log = logging.getLogger("pagedserve.executor")


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
    link = SchedulerLink(context, config.scheduler_address, ready, config.heartbeat_interval_s, curve)
    io_thread = threading.Thread(target=link.run, args=(stop_event,), name="executor-io", daemon=True)
    io_thread.start()
    mirrored_session = 0  # the session whose requests the runner mirrors
    try:
        while not stop_event.is_set():
            try:
                session, step = link.steps.get(timeout=0.2)
            except queue.Empty:
                continue
            if session != link.session:
                continue  # from a scheduler we are no longer connected to: it requeued it
            if session != mirrored_session:
                runner.reset()
                mirrored_session = session
            link.send_result(session, runner.execute(step))
    finally:
        stop_event.set()
        io_thread.join(timeout=5)
        link.close()
        context.term()


def install_signal_handlers(stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT end the step loop cleanly (the current step finishes first)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_event.set())
