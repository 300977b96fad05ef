"""The executor process: a model runner behind a ZeroMQ DEALER socket.

Two threads. The I/O thread (`scheduler_link.py`) owns the socket: it forwards
ExecuteSteps to the step loop, sends results back and heartbeats. The main thread only
pops a step, runs it, pushes the result: it does no network I/O.

Every (re)connection to a scheduler is a new session (see `scheduler_link.py`); the step
loop starts each one from an empty request mirror, since that scheduler sends every
request afresh, and drops the steps of older sessions (their scheduler requeued them).

Tensor parallel: each rank of a group is one such process with its own link; the
scheduler sends every step to every rank and reads rank 0's result only, so the other
ranks send none. A failed collective (a rank died or hung past the group's timeout) ends
the process: the group is broken for good and is restarted as a whole.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid

import zmq

from pagedserve.services.executor.config import ExecutorConfig
from pagedserve.services.executor.distributed import TensorParallelGroup
from pagedserve.services.executor.model_config import load_model_config
from pagedserve.services.executor.model_runner import ModelRunner
from pagedserve.services.executor.scheduler_link import SchedulerLink
from pagedserve.services.executor.tensor_parallel import ShardPlan
from pagedserve.shared.messages import ExecutorReady
from pagedserve.shared.model_source import resolve_model_source
from pagedserve.shared.zmq_security import curve_client

log = logging.getLogger(__name__)


def executor_identity(config: ExecutorConfig) -> tuple[str, str]:
    """(group id, this rank's executor id). Every rank of a group must name the same group:
    the executor id given, else (T > 1) one made from the rendezvous they share."""
    world_size = config.engine.tensor_parallel_size
    if world_size == 1:
        executor_id = config.executor_id or f"executor-{uuid.uuid4().hex[:8]}"
        return executor_id, executor_id
    rendezvous = config.dist_init_address or "env://{}:{}".format(
        os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    )
    group_id = config.executor_id or f"tp-{rendezvous.split('://')[-1]}"
    return group_id, f"{group_id}-rank{config.rank}"


def serve(config: ExecutorConfig, stop_event: threading.Event | None = None) -> None:
    group_id, executor_id = executor_identity(config)
    world_size = config.engine.tensor_parallel_size
    stop_event = stop_event or threading.Event()
    # Before loading the model: a missing key file should fail in milliseconds, not minutes.
    curve = curve_client(config.curve_keys_dir) if config.curve_keys_dir else None
    source = resolve_model_source(config.engine.model)
    if world_size > 1:  # refuse a size the model does not split into before the rendezvous
        ShardPlan.for_model(load_model_config(source), config.rank, world_size)
    group = TensorParallelGroup.join(
        config.rank, world_size, config.dist_init_address, config.engine.torch_device(),
        config.engine.collective_timeout_s,
    )
    runner = ModelRunner(config.engine, source, group)
    log.info(
        "%s: %s on %s, %d KV blocks of %d tokens, %d CPU swap blocks (rank %d of %d)", executor_id, source.name,
        runner.device, runner.num_blocks, runner.block_size, runner.num_swap_blocks, group.rank, world_size,
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
        group_id=group_id,
        rank=group.rank,
        world_size=world_size,
        kv_group_windows=list(runner.kv_layout.windows),
        vocab_size=runner.model_config.vocab_size,
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
            result = runner.execute(step)
            if group.is_driver:  # the scheduler reads rank 0's result only
                link.send_result(session, result)
    except Exception:
        if world_size > 1:
            log.exception("%s: step failed in a group of %d ranks: exiting, the group is restarted as a whole",
                          executor_id, world_size)
        raise
    finally:
        stop_event.set()
        io_thread.join(timeout=5)
        link.close()
        context.term()
        group.close()

