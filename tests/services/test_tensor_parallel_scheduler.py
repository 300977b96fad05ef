"""The scheduler service and a tensor-parallel group, over real ZeroMQ sockets: the real
SchedulerService on its own thread; the two ranks and the gateway are the test's own
DEALER sockets, so that every message the scheduler sends a rank can be read byte for
byte (the real ranks, model and gloo group run in test_tensor_parallel_services.py).

- the group serves only once both ranks have announced themselves, with the smaller
  capacity of the two;
- every step goes to both ranks, identical; rank 1's result is not read, rank 0's is;
- a rank announcing itself again (it restarted) loses the group: its running request
  goes back to the waiting queue with the token it had.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq

from pagedserve.services.launcher import free_port
from pagedserve.services.scheduler.service import SchedulerService, SchedulerServiceConfig
from pagedserve.shared.messages import (
    ExecutorReady,
    RequestDeltas,
    SampledToken,
    SchedulerToGateway,
    StatusQuery,
    StatusSnapshot,
    StepMessage,
    StepResult,
    StepResultMessage,
    SubmitRequest,
)
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.transport import encode

TIMEOUT_MS = 30_000  # a deadline on every receive: a hang fails, a slow machine does not


@pytest.fixture()
def scheduler() -> Iterator[SchedulerServiceConfig]:
    config = SchedulerServiceConfig(
        gateway_address=f"tcp://127.0.0.1:{free_port()}", executor_address=f"tcp://127.0.0.1:{free_port()}"
    )
    context: zmq.Context[Any] = zmq.Context()
    service = SchedulerService(config, context)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name="tp-scheduler", daemon=True)
    thread.start()
    yield config
    stop.set()
    thread.join(timeout=5)
    service.close()
    context.term()


def dealer(context: zmq.Context[Any], address: str, identity: bytes) -> zmq.Socket[Any]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    sock.connect(address)
    return sock


def rank_ready(rank: int, num_blocks: int) -> ExecutorReady:
    return ExecutorReady(
        f"g-rank{rank}", num_blocks, 16, "test-model", f"cpu:{rank}", 512, 2, group_id="g", rank=rank, world_size=2
    )


query_ids = itertools.count(1)


def snapshot(gateway: zmq.Socket[Any]) -> StatusSnapshot:
    query_id = next(query_ids)
    gateway.send_multipart(encode(StatusQuery(query_id)))
    decoder = msgspec.msgpack.Decoder(SchedulerToGateway)
    while True:
        message = decoder.decode(gateway.recv_multipart()[-1])
        if isinstance(message, StatusSnapshot) and message.query_id == query_id:
            return message


def wait_for(gateway: zmq.Socket[Any], condition: Any, what: str) -> StatusSnapshot:
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        status = snapshot(gateway)
        if condition(status):
            return status
    raise TimeoutError(f"waiting for {what}")


def test_a_group_serves_with_its_smallest_capacity_and_every_rank_gets_every_step(
    scheduler: SchedulerServiceConfig,
) -> None:
    context: zmq.Context[Any] = zmq.Context()
    ranks = [dealer(context, scheduler.executor_address, f"g-rank{r}".encode()) for r in range(2)]
    gateway = dealer(context, scheduler.gateway_address, b"gateway-tp")
    try:
        ranks[0].send_multipart(encode(rank_ready(0, 100)))
        ranks[1].send_multipart(encode(rank_ready(1, 80)))
        status = wait_for(gateway, lambda s: len(s.executors) == 2, "the group to serve")
        # Rank 0 alone was no group: the one join is the whole group's (rank 0's announcement
        # was surely read by now: the group needs it), and the pool is sized by its smallest rank.
        assert [(e.executor_id, e.event) for e in status.executor_events] == [("g", "joined")]
        assert [(e.executor_id, e.group_id, e.rank, e.world_size, e.num_blocks, e.device) for e in status.executors] == [
            ("g-rank0", "g", 0, 2, 100, "cpu:0"), ("g-rank1", "g", 1, 2, 80, "cpu:1"),
        ]
        assert status.block_pool is not None and status.block_pool.num_blocks == 80

        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        gateway.send_multipart(encode(SubmitRequest("req-1", [5, 6, 7], params, time.time())))
        frames = [rank.recv_multipart() for rank in ranks]
        assert frames[0] == frames[1], "one step message, the same for every rank"
        step = msgspec.msgpack.decode(frames[0][-1], type=StepMessage).step
        assert [new.request_id for new in step.new_requests] == ["req-1"]

        # Rank 1's (empty) result is not read: were it, it would not match the step.
        ranks[1].send_multipart(encode(StepResultMessage(StepResult(step.step_id, []))))
        ranks[0].send_multipart(encode(StepResultMessage(StepResult(step.step_id, [SampledToken("req-1", 42)]))))
        decoder = msgspec.msgpack.Decoder(SchedulerToGateway)
        deltas = decoder.decode(gateway.recv_multipart()[-1])
        assert isinstance(deltas, RequestDeltas) and deltas.deltas[0].new_token_ids == [42]
        next_steps = [msgspec.msgpack.decode(rank.recv_multipart()[-1], type=StepMessage).step for rank in ranks]
        assert next_steps[0] == next_steps[1] and next_steps[0].new_requests == []  # deltas only

        # Rank 1 restarted: it announces itself again, so the group's collectives are gone.
        ranks[1].send_multipart(encode(rank_ready(1, 80)))
        status = wait_for(gateway, lambda s: s.num_executors_lost == 1, "the group to be lost")
        assert status.executors == [] and status.running == []
        (requeued,) = status.waiting
        assert requeued.num_output_tokens == 1 and requeued.block_ids == []
        assert status.executor_events[-1].executor_id == "g" and status.executor_events[-1].num_requeued == 1
        # Its rank 0 announcing itself too makes the restarted group whole again.
        ranks[0].send_multipart(encode(rank_ready(0, 90)))
        status = wait_for(gateway, lambda s: len(s.executors) == 2, "the restarted group")
        assert status.block_pool is not None and status.block_pool.num_blocks == 80
    finally:
        for sock in (*ranks, gateway):
            sock.close()
        context.term()
