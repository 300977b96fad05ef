"""The gateway's one connection to its scheduler: a ZeroMQ DEALER whose identity is the
gateway id, connected to the scheduler's ROUTER.

One background task receives everything the scheduler sends and dispatches it: the
deltas and errors of a request to the asyncio queue its HTTP handler registered, status
snapshots to the futures waiting for them. Handlers never touch the socket's receive side.

The DEALER is IMMEDIATE: messages are queued only to a connected scheduler, so with no
scheduler a submit fails fast (503) instead of waiting in a buffer and starting
generation long after the client gave up.

A lost connection (the scheduler stopped or restarted) ends every request in flight at
once with a 503 RequestError: a scheduler that comes back knows nothing of them. ZeroMQ
reconnects by itself, with the same identity, so new requests need nothing from us.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.messages import (
    AbortRequest,
    RequestDelta,
    RequestDeltas,
    RequestError,
    SchedulerToGateway,
    StatusQuery,
    StatusSnapshot,
    SubmitRequest,
)
from shared.transport import decode, encode
from shared.zmq_security import CurveEndpoint, apply_curve

log = logging.getLogger(__name__)

RequestEvent = RequestDelta | RequestError

# A status query nobody answered is forgotten (its waiters see "no answer") after this long.
_STATUS_QUERY_EXPIRY_S = 30.0
_FULL_QUEUE_RETRY_S = 0.005  # a connected scheduler whose queue is full: try again after this


class SchedulerUnavailable(Exception):
    """No connected scheduler took the message in time."""


class SchedulerClient:
    def __init__(self, address: str, gateway_id: str, submit_timeout_s: float = 5.0, curve: CurveEndpoint | None = None) -> None:
        self.address = address
        self._curve = curve
        self.gateway_id = gateway_id
        self._submit_timeout_s = submit_timeout_s
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.connected = False  # a scheduler is connected now (handshake done)
        self._connected_event: asyncio.Event | None = None
        self._decoder = msgspec.msgpack.Decoder(SchedulerToGateway)
        self._queues: dict[str, asyncio.Queue[RequestEvent]] = {}
        self._query_ids = itertools.count(1)
        # query id -> (future, loop time the query was sent)
        self._pending_status: dict[int, tuple[asyncio.Future[StatusSnapshot | None], float]] = {}
        self._latest_snapshot: StatusSnapshot | None = None
        self._latest_snapshot_sent_at = float("-inf")  # when the query it answers was sent
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.gateway_id.encode())
        if self._curve is not None:
            apply_curve(sock, self._curve)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RCVHWM, 0)  # never drop our own requests' tokens on receipt
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._connected_event = asyncio.Event()
        sock.connect(self.address)
        self._socket = sock
        self._receiver = asyncio.create_task(self._receive_loop(), name="scheduler-receiver")
        self._watcher = asyncio.create_task(self._watch_connection(), name="scheduler-connection")

    async def close(self, drain_timeout_s: float = 0.5) -> None:
        """Stop, first telling the scheduler to abort whatever this gateway still has in
        flight (a gateway shutting down must not leave its requests holding KV blocks)."""
        if self._socket is not None and self._queues:
            try:
                await self._socket.send_multipart(encode(AbortRequest(list(self._queues))), flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("could not abort %d requests on shutdown: scheduler unavailable", len(self._queues))
            self._queues.clear()
        if self._background:  # aborts already under way get a moment to go out
            await asyncio.wait(list(self._background), timeout=drain_timeout_s)
        for task in (self._receiver, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for future, _ in self._pending_status.values():
            if not future.done():
                future.set_result(None)
        self._pending_status.clear()
        if self._socket is not None:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
            self._socket.close(linger=0)
        if self._context is not None:
            self._context.term()

    # -- requests ----------------------------------------------------------------------

    def register(self, request_ids: list[str], queue: asyncio.Queue[RequestEvent]) -> None:
        """Route these requests' deltas and errors to `queue` (register before submitting,
        or the first delta could arrive with nowhere to go)."""
        for request_id in request_ids:
            self._queues[request_id] = queue

    def unregister(self, request_ids: list[str]) -> None:
        """Late deltas for these ids (after an abort) are dropped from now on."""
        for request_id in request_ids:
            self._queues.pop(request_id, None)

    async def submit(self, requests: list[SubmitRequest]) -> None:
        for request in requests:
            await self._send(request, self._submit_timeout_s)

    async def abort(self, request_ids: list[str]) -> None:
        await self._send(AbortRequest(request_ids), self._submit_timeout_s)

    def abort_soon(self, request_ids: list[str]) -> None:
        """Abort without awaiting: callable from `finally` blocks of cancelled tasks (a
        client that disconnected), where any await would be cancelled on the spot."""
        if not request_ids or self._socket is None:
            return
        task = asyncio.get_running_loop().create_task(self._abort_quietly(list(request_ids)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, request_ids: list[str]) -> None:
        try:
            await self.abort(request_ids)
        except SchedulerUnavailable:
            # The scheduler is gone; whichever one answers next does not know these ids.
            log.warning("could not abort %s: scheduler at %s unavailable", request_ids, self.address)

    # -- status ------------------------------------------------------------------------

    @property
    def latest_snapshot(self) -> StatusSnapshot | None:
        return self._latest_snapshot

    async def status(self, timeout_s: float = 1.0, max_age_s: float = 0.0) -> StatusSnapshot | None:
        """A snapshot whose query was sent at most `max_age_s` ago, or None when the
        scheduler does not answer within `timeout_s`.

        Concurrent callers share one query in flight (a dashboard, /metrics scrapes and
        stall checks must not each cost the scheduler a snapshot).
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._latest_snapshot is not None and now - self._latest_snapshot_sent_at <= max_age_s:
            return self._latest_snapshot
        future = self._join_query_in_flight(now, max_age_s)
        if future is None:
            self._expire_status_queries(now)
            query_id = next(self._query_ids)
            future = loop.create_future()
            self._pending_status[query_id] = (future, now)
            try:
                await self._send(StatusQuery(query_id), timeout_s)
            except SchedulerUnavailable:
                self._pending_status.pop(query_id, None)
                future.set_result(None)
                return None
            timeout_s = max(0.0, timeout_s - (loop.time() - now))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            return None

    def _join_query_in_flight(self, now: float, max_age_s: float) -> asyncio.Future[StatusSnapshot | None] | None:
        # Any query sent within max_age_s counts, but never one older than 1 s: waiting
        # on a query the scheduler may have lost would make every later caller time out.
        for future, sent_at in reversed(self._pending_status.values()):
            if not future.done() and now - sent_at <= max(max_age_s, 1.0):
                return future
        return None

    def _expire_status_queries(self, now: float) -> None:
        for query_id, (future, sent_at) in list(self._pending_status.items()):
            if now - sent_at > _STATUS_QUERY_EXPIRY_S:
                del self._pending_status[query_id]
                if not future.done():
                    future.set_result(None)

    # -- socket ------------------------------------------------------------------------

    async def _send(self, message: msgspec.Struct, timeout_s: float) -> None:
        """Send now if a scheduler is connected (and its queue has room), else wait for
        one up to `timeout_s`. Never blocks the event loop."""
        assert self._socket is not None and self._connected_event is not None, "SchedulerClient.start() was not called"
        frames = encode(message)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                await self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            remaining_s = deadline - asyncio.get_running_loop().time()
            if remaining_s <= 0:
                raise SchedulerUnavailable(f"no scheduler at {self.address} took the message within {timeout_s:g} s")
            # Not `poll(POLLOUT)`: zmq.asyncio queues every later send, NOBLOCK ones too,
            # behind a pending POLLOUT poll, and they would wait for a scheduler forever.
            if self.connected:
                await asyncio.sleep(min(_FULL_QUEUE_RETRY_S, remaining_s))  # connected, its queue full
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._connected_event.wait(), remaining_s)

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            message = decode(frames, self._decoder, peer=f"scheduler {self.address}")
            if message is None:
                continue
            try:
                self._dispatch(message)
            except Exception:  # a bug in dispatch must not stop every other request's tokens
                log.exception("failed to dispatch %s from the scheduler", type(message).__name__)

    async def _watch_connection(self) -> None:
        assert self._monitor is not None and self._connected_event is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self._connected_event.set()
                log.info("connected to the scheduler at %s", self.address)
            elif event["event"] == zmq.EVENT_DISCONNECTED and self.connected:  # not a failed handshake
                self.connected = False
                self._connected_event.clear()
                await self._let_receiver_drain()
                self._fail_in_flight()

    async def _let_receiver_drain(self, max_wait_s: float = 1.0) -> None:
        """ZeroMQ queues everything it read from the connection before reporting it lost:
        let the receive loop dispatch that first, so that a request whose last delta came
        just before the scheduler died finishes rather than fails."""
        assert self._socket is not None
        deadline = asyncio.get_running_loop().time() + max_wait_s
        while await self._socket.poll(0, zmq.POLLIN) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)  # a turn for the receive loop

    def _fail_in_flight(self) -> None:
        """The scheduler went away: whatever it was generating for us is gone with it (one
        that restarts knows nothing of it), so every request in flight ends now, with a 503
        its client can retry, instead of waiting out a stall timeout."""
        request_ids = list(self._queues)
        log.warning("lost the connection to the scheduler at %s: failing %d request(s) in flight", self.address, len(request_ids))
        message = f"lost the connection to the scheduler at {self.address} (it stopped or restarted) mid-request; please retry"
        for request_id in request_ids:
            self._queues.pop(request_id).put_nowait(RequestError(request_id, 503, message, retry_after_s=1.0))
        for future, _ in self._pending_status.values():
            if not future.done():
                future.set_result(None)
        self._pending_status.clear()

    def _dispatch(self, message: RequestDeltas | RequestError | StatusSnapshot) -> None:
        if isinstance(message, RequestDeltas):
            for delta in message.deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
        elif isinstance(message, RequestError):
            queue = self._queues.get(message.request_id)
            if queue is not None:
                queue.put_nowait(message)
            else:
                log.warning("scheduler error for unknown request %s: %s", message.request_id, message.message)
        else:
            entry = self._pending_status.pop(message.query_id, None)
            if entry is None:
                return  # answered after its waiters gave up
            future, sent_at = entry
            if sent_at >= self._latest_snapshot_sent_at:
                self._latest_snapshot, self._latest_snapshot_sent_at = message, sent_at
            if not future.done():
                future.set_result(message)
