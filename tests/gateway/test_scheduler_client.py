"""The gateway's DEALER connection, against the fake scheduler's real ROUTER."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from pagedserve.services.gateway.scheduler_client import SchedulerClient, SchedulerUnavailable
from pagedserve.services.launcher import free_port
from pagedserve.shared.messages import RequestDelta, RequestError, SubmitRequest
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
            started = time.monotonic()
            assert await client.status(0.2) is None
            with pytest.raises(SchedulerUnavailable):
                await client.submit([SubmitRequest("x", [1], SamplingParams(), time.time())])
            assert time.monotonic() - started < 2
        finally:
            await client.close()

    asyncio.run(main())


def test_a_scheduler_that_goes_away_fails_requests_in_flight_and_is_reconnected_to() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()

    def scheduler_socket() -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        return sock

    def submit(request_id: str) -> SubmitRequest:
        return SubmitRequest(request_id, [1, 2], SamplingParams(max_tokens=3), time.time())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        scheduler = scheduler_socket()
        client = SchedulerClient(address, "gw-reconnect", submit_timeout_s=2.0)
        await client.start()
        try:
            queue: asyncio.Queue = asyncio.Queue()
            client.register(["in-flight"], queue)
            await client.submit([submit("in-flight")])
            assert (await asyncio.to_thread(scheduler.recv_multipart))[0] == b"gw-reconnect"
            scheduler.close()  # the scheduler dies with the request

            error = await asyncio.wait_for(queue.get(), 5)  # at once, not after a stall timeout
            assert isinstance(error, RequestError) and error.request_id == "in-flight" and error.status_code == 503
            assert "lost the connection to the scheduler" in error.message

            # While it is down, a message waiting for a scheduler (an abort) must not hold up
            # the others: each gives up after its own timeout.
            started = loop.time()
            waiting_abort = asyncio.create_task(client.abort(["in-flight"]))
            assert await asyncio.gather(client.status(0.2), client.status(0.3)) == [None, None]
            assert loop.time() - started < 1.5
            with pytest.raises(SchedulerUnavailable):
                await waiting_abort

            scheduler = scheduler_socket()  # back on the same address: reconnected, same identity
            await client.submit([submit("after")])
            identity, *frames = await asyncio.to_thread(scheduler.recv_multipart)
            assert identity == b"gw-reconnect"
        finally:
            await client.close()
            scheduler.close()

    asyncio.run(main())
    context.term()
