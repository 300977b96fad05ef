"""The gateway's DEALER connection, against the fake scheduler's real ROUTER."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq

from pagedserve.services.gateway.scheduler_client import SchedulerClient, SchedulerUnavailable
from pagedserve.services.launcher import free_port
from pagedserve.shared.messages import GatewayHeartbeat, GatewayMessage, RequestDelta, RequestError, SubmitRequest
from pagedserve.shared.sampling_params import SamplingParams
from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step


def test_concurrent_queries_share_one_round_trip_per_kind(scheduler: FakeScheduler) -> None:
    async def main() -> None:
        client = SchedulerClient(scheduler.address, "gw-status")
        await client.start()
        try:
            infos = await asyncio.gather(*(client.info(2.0) for _ in range(5)))
            assert all(i is not None and i.max_model_len == scheduler.max_model_len for i in infos)
            assert (scheduler.num_info_queries, scheduler.num_status_queries) == (1, 0)
            assert client.latest_info is infos[0]
            assert await client.info(2.0, max_age_s=60) is infos[0]  # fresh enough: no query
            assert scheduler.num_info_queries == 1

            snapshots = await asyncio.gather(*(client.status(2.0) for _ in range(5)))
            assert all(s is not None and s.max_model_len == scheduler.max_model_len for s in snapshots)
            assert (scheduler.num_info_queries, scheduler.num_status_queries) == (1, 1)
            assert await client.status(2.0, max_age_s=60) is snapshots[0]  # fresh enough: no query
            assert scheduler.num_status_queries == 1
        finally:
            await client.close()

    asyncio.run(main())


def test_an_info_query_naming_requests_is_its_own_and_says_which_are_held(scheduler: FakeScheduler) -> None:
    scheduler.hold = True  # takes requests, produces nothing

    async def main() -> None:
        client = SchedulerClient(scheduler.address, "gw-held")
        await client.start()
        try:
            await client.submit([SubmitRequest("held", [1, 2], SamplingParams(max_tokens=3), time.time())])
            assert await client.info(2.0) is not None
            # Never answered from the cache, nor shared: it must see the submit before it.
            answers = await asyncio.gather(client.info(2.0, max_age_s=60, request_ids=["held", "gone"]), client.info(2.0, request_ids=["gone"]))
            assert [a.held_request_ids if a else None for a in answers] == [["held"], []]
            assert scheduler.num_info_queries == 3
        finally:
            await client.close()

    asyncio.run(main())


def test_deltas_reach_the_registered_queue_and_close_aborts_the_rest(scheduler: FakeScheduler) -> None:
    scheduler.script = one_token_per_step([5, 6, 7])

    async def main() -> list[RequestDelta]:
        client = SchedulerClient(scheduler.address, "gw-deltas")
        await client.start()
        queue: asyncio.Queue = asyncio.Queue()
        client.register(["a", "b"], queue)
        await client.submit([SubmitRequest("a", [1, 2], SamplingParams(max_tokens=3), time.time())])
        received = [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]
        await client.close()  # "b" is still registered
        return received

    received = asyncio.run(main())
    assert [d.new_token_ids for d in received] == [[5], [6], [7]]
    assert received[-1].finish_reason == "length"
    scheduler.wait_for(lambda: "b" in scheduler.aborted, what="the shutdown abort")


def test_no_scheduler_fails_fast() -> None:
    async def main() -> None:
        client = SchedulerClient("tcp://127.0.0.1:1", "gw-nobody", submit_timeout_s=0.2)
        await client.start()
        try:
            # Each gives up after its own timeout (the outer deadline only keeps a hang
            # from lasting forever; it is no bound on speed).
            assert await asyncio.wait_for(client.status(0.2), 60) is None
            with pytest.raises(SchedulerUnavailable, match="within 0.2 s"):
                await asyncio.wait_for(client.submit([SubmitRequest("x", [1], SamplingParams(), time.time())]), 60)
        finally:
            await client.close()

    asyncio.run(main())


RECEIVE_DEADLINE_MS = 30_000  # a receive that waits longer is a hang, reported as a failure


def test_a_scheduler_that_goes_away_fails_requests_in_flight_and_is_reconnected_to() -> None:
    """Deterministic: every wait is on a condition (an event, a received message, a
    connection) with a deadline, and the one timing claim is an order (the queries end
    before the abort that started first), not a wall-clock bound."""
    address = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()

    def scheduler_socket() -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECEIVE_DEADLINE_MS)
        # The old socket's listener is closed by libzmq's reaper thread, asynchronously:
        # binding again can meet it for a moment.
        deadline = time.monotonic() + 30
        while True:
            try:
                sock.bind(address)
                return sock
            except zmq.ZMQError as error:
                if error.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # polling interval of a condition wait

    def submit(request_id: str) -> SubmitRequest:
        return SubmitRequest(request_id, [1, 2], SamplingParams(max_tokens=3), time.time())

    decoder = msgspec.msgpack.Decoder(GatewayMessage)

    async def received_until_submit(sock: zmq.Socket) -> list[GatewayMessage]:
        """What the gateway sent, up to and including its first SubmitRequest (heartbeats
        come on their own schedule too); each from this gateway's identity."""
        messages: list[GatewayMessage] = []
        while not messages or not isinstance(messages[-1], SubmitRequest):
            identity, *frames = await asyncio.to_thread(sock.recv_multipart)  # RCVTIMEO: zmq.Again, not a hang
            assert identity == b"gw-reconnect"
            messages.append(decoder.decode(frames[1]))
        return messages

    async def main() -> None:
        scheduler = scheduler_socket()
        client = SchedulerClient(address, "gw-reconnect", submit_timeout_s=3.0)
        await client.start()
        try:
            queue: asyncio.Queue = asyncio.Queue()
            client.register(["in-flight"], queue)
            await client.submit([submit("in-flight")])
            assert [m.request_id for m in await received_until_submit(scheduler) if isinstance(m, SubmitRequest)] == ["in-flight"]
            scheduler.close()  # the scheduler dies with the request

            # The error comes from the lost connection itself: no stall check runs here.
            error = await asyncio.wait_for(queue.get(), 60)
            assert isinstance(error, RequestError) and error.request_id == "in-flight" and error.status_code == 503
            assert "lost the connection to the scheduler" in error.message
            assert not client.connected

            # Down now: a message is never taken into the dead pipe (it would be lost
            # silently), it waits for a scheduler and fails after its timeout...
            waiting_abort = asyncio.create_task(client.abort(["in-flight"]))
            # ...without holding up the others: queries sent after it give up after their
            # own (shorter) timeouts, while it still waits.
            assert await asyncio.gather(client.status(0.2), client.status(0.3)) == [None, None]
            assert not waiting_abort.done()
            with pytest.raises(SchedulerUnavailable, match="within 3 s"):
                await asyncio.wait_for(waiting_abort, 60)

            scheduler = scheduler_socket()  # back on the same address: reconnected, same identity
            assert await client.wait_connected(60)
            await client.submit([submit("after")])
            # Nothing sent while it was down arrives late (the abort): beats, then the new request.
            messages = await received_until_submit(scheduler)
            assert all(isinstance(m, GatewayHeartbeat) for m in messages[:-1])
            assert messages[-1].request_id == "after"
        finally:
            await client.close()
            scheduler.close()

    asyncio.run(main())
    context.term()
