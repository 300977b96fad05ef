"""The gateway's one connection to its scheduler: a ZeroMQ DEALER whose identity is the
gateway id, connected to the scheduler's ROUTER.

One background task receives everything the scheduler sends and dispatches it: the
deltas and errors of a request to the asyncio queue its HTTP handler registered, answers
to queries to the futures waiting for them. Handlers never touch the socket's receive side.

Two queries: `info()` (SchedulerInfo: counts, context length, which requests it holds),
small and cheap, for everything routine; `status()` (the whole StatusSnapshot, every block
table) for the admin page alone.

The DEALER is IMMEDIATE: messages are queued only to a connected scheduler, so with no
scheduler a submit fails fast (503) instead of waiting in a buffer and starting
generation long after the client gave up.

A heartbeat goes out every second, and one right before every submit: the scheduler
aborts the requests of a gateway it stops hearing (this one died), so their blocks do not
wait for a timeout. The beat before a submit matters: the scheduler times out only
gateways it has heard beat, and the periodic beat can miss a young connection (IMMEDIATE
drops a message sent before the handshake), so a gateway killed within its first second
would otherwise leave its requests running forever. One DEALER connection keeps order,
so the scheduler always hears the beat before the request it covers.

A lost connection (the scheduler stopped or restarted) ends every request in flight at
once with a 503 RequestError: a scheduler that comes back knows nothing of them. ZeroMQ
reconnects by itself, with the same identity, so new requests need nothing from us.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from pagedserve.shared.messages import (
    AbortRequest,
    GatewayHeartbeat,
    InfoQuery,
    RequestDelta,
    RequestDeltas,
    RequestError,
    SchedulerInfo,
    SchedulerToGateway,
    StatusQuery,
    StatusSnapshot,
    SubmitRequest,
)
from pagedserve.shared.transport import MAX_MESSAGE_BYTES, decode, encode
from pagedserve.shared.zmq_security import CurveEndpoint, apply_curve

log = logging.getLogger(__name__)

RequestEvent = RequestDelta | RequestError

# A query nobody answered is forgotten (its waiters see "no answer") after this long.
_QUERY_EXPIRY_S = 30.0
_FULL_QUEUE_RETRY_S = 0.005  # a connected scheduler whose queue is full: try again after this
# The scheduler aborts the requests of a gateway silent past its --gateway-timeout (5 s).
HEARTBEAT_INTERVAL_S = 1.0

Answer = TypeVar("Answer", StatusSnapshot, SchedulerInfo)


class SchedulerUnavailable(Exception):
    """No connected scheduler took the message in time."""


class _Queries(Generic[Answer]):
    """One kind of query: those in flight, and the latest answer with when its query was
    sent (an answer describes the scheduler as it was at some point after that)."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[asyncio.Future[Answer | None], float]] = {}  # query id -> (future, sent at)
        self.latest: Answer | None = None
        self.latest_sent_at = float("-inf")

    def fresh(self, now: float, max_age_s: float) -> Answer | None:
        if self.latest is not None and now - self.latest_sent_at <= max_age_s:
            return self.latest
        return None

    def in_flight(self, now: float, max_age_s: float) -> asyncio.Future[Answer | None] | None:
        # Any query sent within max_age_s counts, but never one older than 1 s: waiting
        # on a query the scheduler may have lost would make every later caller time out.
        for future, sent_at in reversed(self.pending.values()):
            if not future.done() and now - sent_at <= max(max_age_s, 1.0):
                return future
        return None

    def expire(self, now: float) -> None:
        for query_id, (future, sent_at) in list(self.pending.items()):
            if now - sent_at > _QUERY_EXPIRY_S:
                del self.pending[query_id]
                if not future.done():
                    future.set_result(None)

    def answer(self, query_id: int, message: Answer) -> None:
        entry = self.pending.pop(query_id, None)
        if entry is None:
            return  # answered after its waiters gave up
        future, sent_at = entry
        if sent_at >= self.latest_sent_at:
            self.latest, self.latest_sent_at = message, sent_at
        if not future.done():
            future.set_result(message)

    def give_up(self) -> None:
        """No answer will come (the connection is lost or closing): waiters get None."""
        for future, _ in self.pending.values():
            if not future.done():
                future.set_result(None)
        self.pending.clear()


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
        self._heartbeat: asyncio.Task[None] | None = None
        self.connected = False  # a scheduler is connected now (handshake done)
        self.num_connects = 0  # handshakes so far: a new one after a loss is a restarted scheduler
        self._connected_event: asyncio.Event | None = None
        self._decoder = msgspec.msgpack.Decoder(SchedulerToGateway)
        self._queues: dict[str, asyncio.Queue[RequestEvent]] = {}
        self._delta_seq: dict[str, int] = {}  # request id -> the number of its last delta (messages.RequestDelta.seq)
        self._query_ids = itertools.count(1)  # shared by both kinds: an answer names its query
        self._snapshots: _Queries[StatusSnapshot] = _Queries()
        self._infos: _Queries[SchedulerInfo] = _Queries()
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # as make_socket's (shared/transport.py)
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
        self._heartbeat = asyncio.create_task(self._beat(), name="scheduler-heartbeat")

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
        for task in (self._receiver, self._watcher, self._heartbeat):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._snapshots.give_up()
        self._infos.give_up()
        if self._socket is not None:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
            self._socket.close(linger=0)
        if self._context is not None:
            self._context.term()

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until a scheduler is connected (True), or `timeout_s` passes (False)."""
        assert self._connected_event is not None, "SchedulerClient.start() was not called"
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._connected_event.wait(), timeout_s)
        return self.connected

    # -- requests ----------------------------------------------------------------------

    def register(self, request_ids: list[str], queue: asyncio.Queue[RequestEvent]) -> None:
        """Route these requests' deltas and errors to `queue` (register before submitting,
        or the first delta could arrive with nowhere to go)."""
        for request_id in request_ids:
            self._queues[request_id] = queue
            self._delta_seq[request_id] = 0  # a new submission: its scheduler numbers from 1

    def unregister(self, request_ids: list[str]) -> None:
        """Late deltas for these ids (after an abort) are dropped from now on."""
        for request_id in request_ids:
            self._queues.pop(request_id, None)
            self._delta_seq.pop(request_id, None)

    async def submit(self, requests: list[SubmitRequest]) -> None:
        await self._send(GatewayHeartbeat(self.gateway_id, time.time()), self._submit_timeout_s)  # see the module doc
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

    def abort_samples_soon(self, request_id: str, sample_indices: list[int]) -> None:
        """Abort only these samples of an n > 1 request (a stop string ended them here):
        the scheduler frees their blocks while the other samples go on."""
        if not sample_indices or self._socket is None:
            return
        task = asyncio.get_running_loop().create_task(self._abort_quietly([request_id], list(sample_indices)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, request_ids: list[str], sample_indices: list[int] | None = None) -> None:
        try:
            await self._send(AbortRequest(request_ids, sample_indices or []), self._submit_timeout_s)
        except SchedulerUnavailable:
            # The scheduler is gone; whichever one answers next does not know these ids.
            log.warning("could not abort %s: scheduler at %s unavailable", request_ids, self.address)

    # -- queries -----------------------------------------------------------------------

    @property
    def latest_info(self) -> SchedulerInfo | None:
        return self._infos.latest

    async def info(self, timeout_s: float = 1.0, max_age_s: float = 0.0, request_ids: list[str] | None = None) -> SchedulerInfo | None:
        """The scheduler's counts, from a query sent at most `max_age_s` ago, or None when
        it does not answer within `timeout_s`. With `request_ids`, its answer also says
        which of them it still holds: such a query is always sent afresh, after whatever
        the caller submitted, and never shared."""
        if request_ids:
            return await self._ask(self._infos, lambda query_id: InfoQuery(query_id, request_ids), timeout_s)
        return await self._ask(self._infos, InfoQuery, timeout_s, max_age_s, shared=True)

    async def status(self, timeout_s: float = 1.0, max_age_s: float = 0.0) -> StatusSnapshot | None:
        """The whole admin snapshot (every queue and block table: costly for the
        scheduler to build; routine questions ask `info()`), as `info()` without ids."""
        return await self._ask(self._snapshots, StatusQuery, timeout_s, max_age_s, shared=True)

    async def _ask(
        self, queries: _Queries[Answer], make_query: Callable[[int], msgspec.Struct], timeout_s: float,
        max_age_s: float = 0.0, shared: bool = False,
    ) -> Answer | None:
        """Send a query and wait for its answer. `shared`: an answer to a query sent at most
        `max_age_s` ago will do, and concurrent callers share one query in flight (a
        dashboard, /metrics scrapes and health checks must not each cost one)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        future = None
        if shared:
            latest = queries.fresh(now, max_age_s)
            if latest is not None:
                return latest
            future = queries.in_flight(now, max_age_s)
        if future is None:
            queries.expire(now)
            query_id = next(self._query_ids)
            future = loop.create_future()
            queries.pending[query_id] = (future, now)
            try:
                await self._send(make_query(query_id), timeout_s)
            except SchedulerUnavailable:
                queries.pending.pop(query_id, None)
                future.set_result(None)  # for callers that joined it meanwhile
                return None
            timeout_s = max(0.0, timeout_s - (loop.time() - now))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            return None

    # -- socket ------------------------------------------------------------------------

    async def _send(self, message: msgspec.Struct, timeout_s: float) -> None:
        """Send now if a scheduler is connected (and its queue has room), else wait for
        one up to `timeout_s`. Never blocks the event loop.

        `connected` is asked before the socket, never after: once a connection is lost,
        libzmq can report it (our monitor clears `connected` and fails the requests in
        flight) before it tears the pipe down, and a send in that window is taken into the
        dead pipe and silently lost: a submit would then wait for the stall timeout instead
        of failing here. A send in the opposite window (pipe already dead, event not yet
        read) is lost too, but only for a request registered before it, which the coming
        event fails with a 503."""
        assert self._socket is not None and self._connected_event is not None, "SchedulerClient.start() was not called"
        frames = encode(message)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if self.connected:
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

    async def _beat(self) -> None:
        """A heartbeat every second; one the queue has no room for is skipped (the next
        follows in a second, well inside the scheduler's timeout). Sent whether or not the
        connection monitor has reported the link up: a missed connect event must not leave
        the scheduler unable to tell that this gateway died."""
        assert self._socket is not None
        while True:
            with contextlib.suppress(zmq.Again):
                await self._socket.send_multipart(encode(GatewayHeartbeat(self.gateway_id, time.time())), flags=zmq.NOBLOCK)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)  # the beat's period, not a synchronisation

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
                self.num_connects += 1
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
        self._delta_seq.clear()
        self._snapshots.give_up()
        self._infos.give_up()

    def _in_sequence(self, delta: RequestDelta, queue: asyncio.Queue[RequestEvent]) -> bool:
        """Whether `delta` follows the request's last one. After a gap (the scheduler's
        socket dropped deltas at its high-water mark) the request fails with a 503 its
        client can retry, and is aborted at the scheduler: its text would have a hole."""
        if delta.seq == 0:  # a scheduler that does not number its deltas
            return True
        expected = self._delta_seq.get(delta.request_id, 0) + 1
        if delta.seq == expected:
            self._delta_seq[delta.request_id] = delta.seq
            return True
        request_id = delta.request_id
        log.error("request %s: delta %d from %s after %d: %d lost", request_id, delta.seq, self.address, expected - 1, delta.seq - expected)
        self.unregister([request_id])
        queue.put_nowait(RequestError(
            request_id, 503,
            f"{delta.seq - expected} message(s) of this request from the scheduler at {self.address} were lost (its send "
            "queue overflowed): the output would have a hole; please retry",
            retry_after_s=1.0,
        ))
        self.abort_soon([request_id])
        return False

    def _dispatch(self, message: RequestDeltas | RequestError | StatusSnapshot | SchedulerInfo) -> None:
        if isinstance(message, RequestDeltas):
            for delta in message.deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None and self._in_sequence(delta, queue):
                    queue.put_nowait(delta)
        elif isinstance(message, RequestError):
            queue = self._queues.get(message.request_id)
            if queue is not None:
                queue.put_nowait(message)
            else:
                log.warning("scheduler error for unknown request %s: %s", message.request_id, message.message)
        elif isinstance(message, SchedulerInfo):
            self._infos.answer(message.query_id, message)
        else:
            self._snapshots.answer(message.query_id, message)
