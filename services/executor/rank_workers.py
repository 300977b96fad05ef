"""Ranks 1 .. T-1 of the in-process engine's tensor-parallel group, as child processes.

The engine process is rank 0 (it samples and answers); each other rank is a real process
with its own shard of the model and of the KV cache, in a real gloo/NCCL group with rank 0.
Steps reach them as they reach a service executor: the same msgspec `StepMessage`,
encoded once and pushed to every rank over ZeroMQ. They send nothing back: the group's
collectives keep them in step, and a rank that dies or hangs fails rank 0's next
collective within the group's timeout.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
from typing import Any

import msgspec
import zmq

from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.messages import ExecuteStep, StepMessage
from pagedserve.shared.transport import decode, encode, make_socket

log = logging.getLogger(__name__)

_STOP = b"stop"


def local_rendezvous_address() -> str:
    """A tcp:// rendezvous on a free loopback port, for ranks on this host."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class RankWorkers:
    """Starts ranks 1 .. T-1 (spawned: a forked torch is unsafe) at construction; rank 0
    then joins the group at `init_address`."""

    def __init__(self, config: EngineConfig) -> None:
        self.init_address = local_rendezvous_address()
        self._context = zmq.Context()
        self._sockets: list[zmq.Socket[Any]] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        spawn = multiprocessing.get_context("spawn")
        encoded_config = msgspec.msgpack.encode(config)
        for rank in range(1, config.tensor_parallel_size):
            sock = make_socket(self._context, zmq.PUSH)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self._sockets.append(sock)
            process = spawn.Process(
                target=run_rank,
                args=(encoded_config, rank, self.init_address, f"tcp://127.0.0.1:{port}"),
                name=f"tp-rank-{rank}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)

    def send(self, step: ExecuteStep) -> None:
        """One encoding, the same frames to every rank (deltas only, as to rank 0)."""
        frames = encode(StepMessage(step=step))
        for sock in self._sockets:
            sock.send_multipart(frames)

    def close(self, timeout_s: float = 10.0) -> None:
        for sock in self._sockets:
            try:
                sock.send(_STOP, zmq.NOBLOCK)
            except zmq.Again:  # that rank never connected (it failed to start): nothing to stop
                pass
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.terminate()
                process.join(timeout_s)
        for sock in self._sockets:
            sock.close(linger=0)
        self._context.term()


def run_rank(encoded_config: bytes, rank: int, init_address: str, step_address: str) -> None:
    """A child rank: join the group, load its shard, run every step it is pushed."""
    from pagedserve.services.executor.distributed import TensorParallelGroup
    from pagedserve.services.executor.model_runner import ModelRunner
    from pagedserve.shared.model_source import resolve_model_source

    config = msgspec.msgpack.decode(encoded_config, type=EngineConfig)
    group = TensorParallelGroup.join(
        rank, config.tensor_parallel_size, init_address, config.torch_device(), config.collective_timeout_s
    )
    context = zmq.Context()
    steps = make_socket(context, zmq.PULL)
    steps.connect(step_address)
    decoder = msgspec.msgpack.Decoder(StepMessage)
    try:
        runner = ModelRunner(config, resolve_model_source(config.model), group)
        while True:
            frames = steps.recv_multipart()
            if frames == [_STOP]:
                return
            message = decode(frames, decoder, peer="engine")
            if message is not None:
                runner.execute(message.step)
    finally:
        steps.close(linger=0)
        context.term()
        group.close()
