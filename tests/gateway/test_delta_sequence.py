"""Deltas are numbered per request (issue #26): the scheduler's ROUTER drops messages to a
gateway at its high-water mark, silently, and a dropped delta used to become a hole in
the text. The scheduler numbers each request's deltas 1, 2, 3...; the gateway's client
fails a request whose next delta skips a number (503, retryable) and aborts it.

Both ends over real ZeroMQ sockets: the real scheduler service with the service tests'
fake executor, and the real SchedulerClient facing a raw ROUTER that plays a scheduler
whose queue overflowed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import zmq

from pagedserve.services.gateway.scheduler_client import SchedulerClient
from pagedserve.shared.messages import AbortRequest, GatewayMessage, RequestDelta, RequestDeltas, RequestError
from pagedserve.shared.transport import decode, encode
from tests.cluster import wait_until
from tests.scheduler.test_service import (  # noqa: F401  (start_service is a fixture)
    Gateway,
    Service,
    drive,
    executor_joined,
    start_service,
)


def test_the_scheduler_numbers_each_request_s_deltas_from_one(start_service: Callable[..., Service]) -> None:
    service = start_service(heartbeat_timeout_s=5.0)
    executor = service.executor("first")
    wait_until(lambda: executor_joined(service, "first"), 5, "the executor to join")
    seqs: dict[str, list[int]] = {"a": [], "b": []}
    take = service.gateway._take

    def numbered(message: object) -> None:
        if isinstance(message, RequestDeltas):
            for delta in message.deltas:
                seqs[delta.request_id].append(delta.seq)
        take(message)

    service.gateway._take = numbered  # type: ignore[method-assign]
    service.gateway.submit("a")
    service.gateway.submit("b")
    drive(service, executor, lambda g: len(g.finished) == 2)
    for request_id, numbers in seqs.items():
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 1, (request_id, numbers)


def test_a_gap_in_a_request_s_deltas_fails_it_and_aborts_it_at_the_scheduler() -> None:
    async def scenario() -> None:
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        client = SchedulerClient(f"tcp://127.0.0.1:{port}", "gateway-seq")
        await client.start()
        decoder = msgspec.msgpack.Decoder(GatewayMessage)

        async def from_gateway() -> object:
            while not router.poll(0):
                await asyncio.sleep(0.01)  # polling interval of a condition wait
            _, *frames = router.recv_multipart()
            return decode(frames, decoder)

        try:
            await asyncio.wait_for(client.wait_connected(10), 15)
            queue: asyncio.Queue = asyncio.Queue()
            client.register(["r1", "r2"], queue)
            identity = b"gateway-seq"
            router.send_multipart([identity, *encode(RequestDeltas([RequestDelta("r1", [5], seq=1), RequestDelta("r2", [6], seq=1)]))])
            # r1's delta 2 was dropped at the high-water mark: 3 comes next.
            router.send_multipart([identity, *encode(RequestDeltas([RequestDelta("r1", [7], seq=3), RequestDelta("r2", [8], seq=2)]))])
            events = [await asyncio.wait_for(queue.get(), 10) for _ in range(4)]
            r1 = [e for e in events if e.request_id == "r1"]
            assert isinstance(r1[0], RequestDelta) and r1[0].new_token_ids == [5]
            assert isinstance(r1[1], RequestError) and r1[1].status_code == 503 and "lost" in r1[1].message
            assert [e.new_token_ids for e in events if e.request_id == "r2"] == [[6], [8]]  # r2 is untouched
            while True:  # heartbeats first, then the abort of r1
                message = await asyncio.wait_for(from_gateway(), 10)
                if isinstance(message, AbortRequest):
                    assert message.request_ids == ["r1"]
                    break
            # Later deltas of r1 go nowhere; r2 goes on.
            router.send_multipart([identity, *encode(RequestDeltas([RequestDelta("r1", [9], seq=4), RequestDelta("r2", [10], seq=3)]))])
            assert (await asyncio.wait_for(queue.get(), 10)).new_token_ids == [10]
            assert queue.empty()
        finally:
            await client.close()
            context.destroy(linger=0)

    asyncio.run(scenario())
