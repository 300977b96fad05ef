"""The scheduler process: the pure scheduler core behind two ZeroMQ ROUTER sockets.

One loop, no threads: poll the gateway and executor sockets, apply what arrived (new
requests, aborts, status and info queries, executor capacity, step results), and whenever
no step is in flight and work is pending, schedule the next step and send it. Everything it
does between polls is in-memory; Redis mirroring happens on its own thread.

Asynchronous scheduling (`async_scheduling`, as vLLM's; off by default, see docs/architecture.md,
"Asynchronous scheduling", for the measurement): with one step in flight, the next is
scheduled and sent at once, so that the executor finds it queued when
it finishes the current one and the scheduler's work (and both ZeroMQ hops) hide behind
the model's. The core counts each running request one token further (`Scheduler.
can_schedule_ahead` says when that is exact); the executor fills in the token it sampled
itself. A request that the earlier result finishes has its surplus token dropped, never
streamed. Outputs equal the synchronous order's token for token.

When a client request is over is the core's to say (`RequestDelta.request_finished`); the
service only forwards deltas to the gateway that asked and forgets the owner then. Redis
holds what this scheduler alone knows: its replica's load (`replica:{id}`) and the
prefixes its KV cache holds (`prefix:{id}`); request records (`req:{id}`) are the
gateway's.

Executor loss: an executor that sends nothing (heartbeat or result) for
`heartbeat_timeout_s` is lost. Its running requests, the step in flight included, go back
to the waiting queue for recompute, keeping the tokens already streamed, and wait up to
`executor_timeout_s` for an executor to announce itself (ExecutorReady: a restarted one,
or the same one reconnecting); then they, and whatever arrived meanwhile, end with a 503.
Every ExecutorReady starts the executor afresh: its KV cache and request mirror are
unknown, so nothing running or cached is trusted and everything running recomputes.

Tensor parallel: the T ranks of a group each connect and announce themselves (same
`group_id`, their `rank`); the group serves once all have, sized by the smallest capacity
any reports. Each step goes to every rank (encoded once), the result is rank 0's, and the
group is lost as soon as any rank is (silent, or announcing itself again: it restarted).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import defaultdict, deque
from typing import Any

import msgspec
import zmq

from pagedserve.services.scheduler.executor_group import ExecutorGroup, GroupAssembly
from pagedserve.services.scheduler.redis_mirror import RedisMirror
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.scheduler import QueueFullError, Scheduler
from pagedserve.services.scheduler.status import StepHistory, block_pool_status, request_status
from pagedserve.shared.messages import (
    AbortRequest,
    ExecuteStep,
    ExecutorEvent,
    ExecutorMessage,
    ExecutorReady,
    ExecutorStatus,
    GatewayHeartbeat,
    GatewayMessage,
    InfoQuery,
    RequestDelta,
    RequestDeltas,
    RequestError,
    SchedulerInfo,
    StatusQuery,
    StatusSnapshot,
    StepMessage,
    StepResultMessage,
    StepStats,
    SubmitRequest,
)
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.transport import decode, encode, make_socket
from pagedserve.shared.zmq_security import curve_server, start_curve_authenticator

log = logging.getLogger(__name__)


class SchedulerServiceConfig(msgspec.Struct, forbid_unknown_fields=True):
    gateway_address: str = "tcp://127.0.0.1:5555"  # bound: gateways connect here
    executor_address: str = "tcp://127.0.0.1:5556"  # bound: executors connect here
    # The core's limits; max_model_len (None: the executor's) caps what the executor reports.
    limits: SchedulingLimits = msgspec.field(default_factory=SchedulingLimits)
    heartbeat_timeout_s: float = 3.0  # an executor silent this long is lost (it beats every 1 s)
    executor_timeout_s: float = 60.0  # requeued requests wait this long for an executor to join
    redis_url: str | None = None
    replica_id: str = "replica-0"
    # Where gateways should connect, as registered in Redis (None: `gateway_address`, or
    # this host's name when that binds a wildcard such as tcp://*:5555).
    advertise_address: str | None = None
    # A gateway that owns requests and has sent nothing (it beats every second) for this
    # long is gone: its requests are aborted and their blocks freed.
    gateway_timeout_s: float = 5.0
    curve_keys_dir: str | None = None  # CURVE-secure both sockets (shared/zmq_security.py)
    # Schedule step n+1 while the executor runs step n (see the module docstring). Off by
    # default: on 2 CPU cores, all of them the executor's, the overlap did not win.
    async_scheduling: bool = False
    # A request running each time an executor is lost may be what kills it: replayed
    # after every restart, it would take the replica down for good. After this many
    # requeues it fails instead (500).
    max_requeues: int = 3


def token_ids_outside_vocabulary(submit: SubmitRequest, vocab_size: int) -> str | None:
    """Why `submit` names a token id no embedding row or logit has, or None. The gateway
    checks too; this guards the executor from any other peer on the gateway socket."""
    if vocab_size <= 0:
        return None
    params = submit.sampling_params
    for what, token_ids in (
        ("prompt", submit.prompt_token_ids), ("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias),
    ):
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            return f"token id {bad} in {what} is outside the vocabulary (0..{vocab_size - 1})"
    return None


class SchedulerService:
    def __init__(self, config: SchedulerServiceConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        curve = curve_server(config.curve_keys_dir) if config.curve_keys_dir else None
        # The authenticator must run before the sockets bind, or clients go unchecked.
        self.authenticator = start_curve_authenticator(self.context, config.curve_keys_dir) if config.curve_keys_dir else None
        self.gateways = make_socket(self.context, zmq.ROUTER, curve=curve)
        self.gateways.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.gateways.bind(config.gateway_address)
        self.executors = make_socket(self.context, zmq.ROUTER, curve=curve)
        # A restarted executor may reuse its id while its old connection lingers.
        self.executors.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.executors.bind(config.executor_address)
        self.core: Scheduler | None = None  # sized by the first executor's capacity
        self.executor: ExecutorGroup | None = None  # the one steps go to; None while lost
        self.assembling_groups = GroupAssembly()  # tensor-parallel groups not all announced
        # The latest executor to join, kept after it is lost: requests arriving meanwhile
        # need its EOS token, and it is taken back should it speak again (it was only slow).
        self.last_executor: ExecutorGroup | None = None
        self.executor_lost_at: float | None = None  # monotonic; set while none replaces it
        self.num_executors_lost = 0
        self.executor_events: deque[ExecutorEvent] = deque(maxlen=20)
        # Steps sent and not answered, oldest first: one, or two with asynchronous scheduling.
        self.in_flight: deque[ExecuteStep] = deque()
        # Client request id -> the identity of the gateway that asked for it, until the core
        # flags its last delta; forked samples and beams report under the client's id.
        self.owner_of: dict[str, bytes] = {}
        self.requeues_of: dict[str, int] = {}  # client request id -> executors lost while it ran
        self.delta_seq_of: dict[str, int] = {}  # client request id -> the last delta's number
        # Gateways that beat (GatewayHeartbeat): identity -> when last heard (monotonic).
        # One silent past gateway_timeout_s died: its requests are aborted.
        self.gateway_last_heard: dict[bytes, float] = {}
        self.history = StepHistory()
        self.started_at = time.monotonic()
        self.redis = RedisMirror(config.redis_url, config.replica_id) if config.redis_url else None
        self._next_load_report = 0.0
        self._gateway_decoder = msgspec.msgpack.Decoder(GatewayMessage)
        self._executor_decoder = msgspec.msgpack.Decoder(ExecutorMessage)

    # --- the loop -------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.gateways, zmq.POLLIN)
        poller.register(self.executors, zmq.POLLIN)
        while not stop_event.is_set():
            events = dict(poller.poll(100))
            if self.executors in events:
                self._drain(self.executors, self._on_executor_frames)
            if self.gateways in events:
                self._drain(self.gateways, self._on_gateway_frames)
            self._check_executor(time.monotonic())
            self._check_gateways(time.monotonic())
            self._maybe_step()
            self._maybe_report_load()

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        self.gateways.close()
        self.executors.close()
        if self.authenticator is not None:
            self.authenticator.stop()

    @staticmethod
    def _drain(sock: zmq.Socket[Any], handle: Any) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _maybe_step(self) -> None:
        core, executor = self.core, self.executor
        if core is None or executor is None or not core.has_unfinished_requests():
            return
        if self.in_flight and not (
            self.config.async_scheduling and len(self.in_flight) == 1 and core.can_schedule_ahead()
        ):
            return
        step = core.schedule()
        if not (step.num_scheduled_tokens or step.dropped_request_ids or step.swap_out):
            return  # nothing to run or to tell the executor this instant
        self.in_flight.append(step)
        frames = encode(StepMessage(step=step))  # once, for every rank of the group
        for rank in executor.ranks:
            self.executors.send_multipart([rank.identity, *frames])

    def _maybe_report_load(self) -> None:
        """Replica heartbeat and load, and the changes to its cached prefixes, once a
        second, for gateways that route by load or by prefix-cache hits."""
        now = time.monotonic()
        if self.redis is None or now < self._next_load_report:
            return
        self._next_load_report = now + 1.0
        core = self.core
        if core is not None:
            self.redis.update_prefix_cache(core.take_prefix_cache_events())
            if self.redis.resync_wanted.is_set():
                pool = core.block_pool
                hashes = [pool.block_hash(block_id) for block_id in range(pool.num_blocks)]
                self.redis.resync_prefix_cache([h for h in hashes if h is not None])
        self.redis.update_replica(
            {
                "heartbeat_at": time.time(),
                "gateway_address": advertised_gateway_address(self.config),
                "model": self.last_executor.ready.model if self.last_executor else "",
                "block_size": self.last_executor.ready.block_size if self.last_executor else 0,
                "num_executors_alive": sum(e.alive for e in self._executor_statuses(now)),
                "num_running": core.num_running if core else 0,
                "num_waiting": core.num_waiting if core else 0,
                "num_free_blocks": core.block_pool.num_free_blocks if core else 0,
                "num_blocks": core.block_pool.num_blocks if core else 0,
            },
        )

    # --- executors ------------------------------------------------------------------

    def _on_executor_frames(self, frames: list[bytes]) -> None:
        identity, payload = frames[0], frames[1:]
        message = decode(payload, self._executor_decoder, peer=f"executor {identity!r}")
        if message is None:
            return
        now = time.monotonic()
        if isinstance(message, ExecutorReady):
            if message.world_size > 1:
                self._on_rank_ready(identity, message, now)
            else:
                self._on_executor_ready(ExecutorGroup.single(identity, message, now), now)
            return
        executor = self.executor
        if executor is not None and (rank := executor.rank_of(identity)) is not None:
            rank.last_heard = now
            if isinstance(message, StepResultMessage) and identity == executor.identity:  # rank 0's
                self._on_step_result(message, now)
            return
        last = self.last_executor
        if executor is None and last is not None and (rank := last.rank_of(identity)) is not None:
            rank.last_heard = now
            if all(r.last_heard > (self.executor_lost_at or 0.0) for r in last.ranks):
                # Counted as lost, yet every rank speaks: it was only slow. It serves again,
                # from scratch (the next step tells it to forget every request it mirrors).
                log.warning("executor %s is alive after all: serving again", last.ready.executor_id)
                self._on_executor_ready(last, now)
        # Anything else comes from an executor replaced by another, or from before this
        # scheduler started (an executor announces itself again when it reconnects).

    def _on_rank_ready(self, identity: bytes, ready: ExecutorReady, now: float) -> None:
        """A rank of a tensor-parallel group announced itself. The group serves once all
        its ranks have, with the smallest capacity any reports (a block id must exist on
        every rank). A rank of the serving group announcing itself again has restarted or
        reconnected: the group's collectives are broken, so the group is lost."""
        executor = self.executor
        if executor is not None and executor.ready.group_id == ready.group_id:
            self._lose_executor(f"rank {ready.rank} of group {ready.group_id} announced itself again", now)
        group = self.assembling_groups.add(identity, ready, now)
        if group is None:
            log.info("group %s: rank %d of %d ready, waiting for the others", ready.group_id, ready.rank, ready.world_size)
            return
        self._on_executor_ready(group, now)

    def _on_executor_ready(self, group: ExecutorGroup, now: float) -> None:
        """An executor (or every rank of a group) announced itself: started, reconnected,
        or replacing the one we had. What its KV cache and request mirror hold is unknown,
        so everything running is requeued for recompute and no cached prefix is trusted."""
        identity, ready = group.identity, group.ready
        core, last = self.core, self.last_executor
        requeued: list[str] = []
        if core is None or last is None:
            self.core = self._new_core(ready)
        else:
            if (ready.model, ready.block_size, ready.max_model_len) != (last.ready.model, last.ready.block_size, last.ready.max_model_len):
                log.error(
                    "executor %s (%s, %d-token blocks, max_model_len %d) cannot serve this scheduler's requests "
                    "(%s, %d-token blocks, max_model_len %d): ignored", ready.executor_id, ready.model, ready.block_size,
                    ready.max_model_len, last.ready.model, last.ready.block_size, last.ready.max_model_len,
                )
                return
            running = [r.client_request_id for r in core.running]
            requeued = core.requeue_all_running()
            self.in_flight.clear()  # their results, should they come, are dropped
            self._count_requeues(running)
            if self.executor is not None and self.executor.identity != identity:
                log.warning("executor %s replaces %s", ready.executor_id, self.executor.ready.executor_id)
            num_swap_blocks = core.swap_pool.num_blocks if core.swap_pool else 0
            if (ready.num_blocks, ready.num_swap_blocks) != (core.block_pool.num_blocks, num_swap_blocks):
                self._resize(ready)
        for rank in group.ranks:
            rank.last_heard = now
        self.executor = self.last_executor = group
        self.executor_lost_at = None
        detail = f"{ready.model} on {ready.device}, {ready.num_blocks:,} blocks of {ready.block_size} tokens"
        if ready.world_size > 1:
            detail += f", {ready.world_size} tensor-parallel ranks"
        if ready.num_swap_blocks:
            detail += f", {ready.num_swap_blocks:,} swap blocks"
        self._record_event(ready.executor_id, "joined", detail, len(requeued))
        log.info("executor %s ready: %s; %d running request(s) requeued", ready.executor_id, detail, len(requeued))

    def _new_core(self, ready: ExecutorReady) -> Scheduler:
        if self.redis is not None:
            self.redis.clear_prefix_cache()  # a new core starts with an empty cache
        return Scheduler(
            SchedulerConfig(limits=self.config.limits.resolved(ready.max_model_len), model=ready.model),
            num_blocks=ready.num_blocks,
            block_size=ready.block_size,
            num_swap_blocks=ready.num_swap_blocks,
            record_prefix_cache_events=self.redis is not None,
            kv_group_windows=tuple(ready.kv_group_windows) or (None,),
        )

    def _resize(self, ready: ExecutorReady) -> None:
        """A replacement executor with another KV capacity (a GPU's free memory varies
        between starts): a core sized for it takes over the waiting requests, in their
        order (nothing runs: the caller requeued it all). Those that no longer fit fail."""
        old = self.core
        assert old is not None and not old.num_running
        self.core = self._new_core(ready)
        for req in old.waiting:
            try:
                self.core.add_request(req)
            except (ValueError, QueueFullError) as error:
                self._send_error(req.client_request_id, 503, f"the replacement executor cannot take this request: {error}")

    def _check_executor(self, now: float) -> None:
        executor, core = self.executor, self.core
        if executor is not None:
            silent_s = now - executor.last_heard
            if silent_s > self.config.heartbeat_timeout_s:
                self._lose_executor(f"no heartbeat for {silent_s:.1f} s", now)
        elif self.executor_lost_at is not None and core is not None and core.has_unfinished_requests():
            if now - self.executor_lost_at > self.config.executor_timeout_s:
                # Client ids, once each: failing a request fails all its samples.
                request_ids = list(dict.fromkeys(r.client_request_id for r in (*core.running, *core.waiting)))
                log.error("%s: failing %d request(s)", self._no_executor_message(now), len(request_ids))
                self._fail_requests(request_ids, 503, self._no_executor_message(now))

    def _check_gateways(self, now: float) -> None:
        """Abort the requests of a gateway that beat and went silent (it died: nobody will
        read their tokens or abort them), freeing their blocks. A gateway that never beat
        (an older one, or a test's socket) is never timed out."""
        timeout_s = self.config.gateway_timeout_s
        for identity, last_heard in list(self.gateway_last_heard.items()):
            if now - last_heard <= timeout_s:
                continue
            del self.gateway_last_heard[identity]
            request_ids = [request_id for request_id, owner in self.owner_of.items() if owner == identity]
            for request_id in request_ids:
                del self.owner_of[request_id]
            if self.core is not None and request_ids:
                self.core.abort_requests(request_ids)  # their "abort" deltas have nobody to go to
            log.warning(
                "gateway %s silent for %.1f s (timeout %g s): gone; aborted its %d request(s)",
                identity.decode(errors="replace"), now - last_heard, timeout_s, len(request_ids),
            )

    def _lose_executor(self, reason: str, now: float) -> None:
        executor, core = self.executor, self.core
        assert executor is not None and core is not None
        running = [r.client_request_id for r in core.running]
        requeued = core.requeue_all_running()
        self.in_flight.clear()  # their results, should they come, are dropped
        self._count_requeues(running)
        self.executor = None
        self.executor_lost_at = now
        self.num_executors_lost += 1
        self._record_event(executor.ready.executor_id, "lost", reason, len(requeued))
        log.warning(
            "executor %s lost (%s): %d running request(s) requeued for recompute, %d waiting in all; "
            "waiting up to %g s for an executor", executor.ready.executor_id, reason, len(requeued),
            core.num_waiting, self.config.executor_timeout_s,
        )

    def _count_requeues(self, client_request_ids: list[str]) -> None:
        """Count one more requeue for each request that was running; fail those past
        --max-requeues (every sample of one: a crash-looping request is one request)."""
        # Forget the requests that have ended since (cheap: executors are rarely lost).
        self.requeues_of = {i: n for i, n in self.requeues_of.items() if i in self.owner_of}
        limit = self.config.max_requeues
        failed = []
        for request_id in dict.fromkeys(client_request_ids):
            count = self.requeues_of[request_id] = self.requeues_of.get(request_id, 0) + 1
            if count > limit:
                failed.append(request_id)
                del self.requeues_of[request_id]
        if failed:
            log.error("failing %d request(s) running at %d executor losses: %s", len(failed), limit + 1, ", ".join(failed))
            self._fail_requests(
                failed, 500,
                f"an executor was lost {limit + 1} times while this request ran (--max-requeues {limit}): it may be "
                "what crashes the executor, so it is not run again",
            )

    def _no_executor_message(self, now: float) -> str:
        lost_for_s = now - (self.executor_lost_at or now)
        last = self.last_executor.ready.executor_id if self.last_executor else "?"
        return (
            f"no executor for {lost_for_s:.0f} s: executor {last} was lost and none joined within "
            f"the scheduler's executor timeout ({self.config.executor_timeout_s:g} s); retry later"
        )

    def _record_event(self, executor_id: str, event: str, detail: str, num_requeued: int) -> None:
        self.executor_events.append(ExecutorEvent(time.time(), executor_id, event, detail, num_requeued))

    def _on_step_result(self, message: StepResultMessage, now: float) -> None:
        if not self.in_flight or self.core is None or message.result.step_id != self.in_flight[0].step_id:
            # Normal after an executor reset: the result of a step that was requeued.
            log.info("dropped a result for step %d: not the oldest step in flight", message.result.step_id)
            return
        step = self.in_flight.popleft()
        try:
            deltas = self.core.update_from_output(step, message.result)
        except ValueError as error:
            # The executor's mirror disagrees with ours (nothing was applied): start it over
            # rather than trust either; it is taken back at its next heartbeat.
            log.error("step %d: %s", step.step_id, error)
            self._lose_executor(f"its result for step {step.step_id} did not match the step", now)
            return
        self.history.record(time.monotonic(), len(step.num_scheduled_tokens), sum(step.num_scheduled_tokens))
        self._send_deltas(deltas)

    # --- gateways -------------------------------------------------------------------

    def _on_gateway_frames(self, frames: list[bytes]) -> None:
        identity, payload = frames[0], frames[1:]
        message = decode(payload, self._gateway_decoder, peer=f"gateway {identity!r}")
        if isinstance(message, GatewayHeartbeat) or identity in self.gateway_last_heard:
            self.gateway_last_heard[identity] = time.monotonic()  # any message shows it alive
        if isinstance(message, SubmitRequest):
            self._on_submit(identity, message)
        elif isinstance(message, AbortRequest):
            if self.core is not None and message.sample_indices:
                for request_id in message.request_ids:
                    self._send_deltas(self.core.abort_samples(request_id, message.sample_indices))
            elif self.core is not None:
                self._send_deltas(self.core.abort_requests(message.request_ids))
        elif isinstance(message, InfoQuery):
            self._send(identity, self.info(message))
        elif isinstance(message, StatusQuery):
            self._send(identity, self.snapshot(message.query_id))

    def _on_submit(self, identity: bytes, submit: SubmitRequest) -> None:
        if self.core is None or self.last_executor is None:
            self._send(identity, RequestError(submit.request_id, 503, "no executor has joined this scheduler yet", 1.0))
            return
        outside = token_ids_outside_vocabulary(submit, self.last_executor.ready.vocab_size)
        if outside is not None:
            self._send(identity, RequestError(submit.request_id, 400, outside))
            return
        now = time.monotonic()
        if self.executor_lost_at is not None and now - self.executor_lost_at > self.config.executor_timeout_s:
            self._send(identity, RequestError(submit.request_id, 503, self._no_executor_message(now), 5.0))
            return
        # While an executor is lost (but not for long) requests queue: a restart is usually quick.
        try:
            submit.sampling_params.validate()
            self.core.add_request(
                Request(
                    submit.request_id,
                    submit.prompt_token_ids,
                    submit.sampling_params,
                    arrival_time=submit.arrival_time,
                    eos_token_id=self.last_executor.ready.eos_token_id,
                    priority=submit.priority,
                    cache_salt=submit.cache_salt,
                )
            )
        except QueueFullError as error:
            self._send(identity, RequestError(submit.request_id, 429, str(error), 1.0))
            return
        except ValueError as error:
            self._send(identity, RequestError(submit.request_id, 400, str(error)))
            return
        self.owner_of[submit.request_id] = identity

    def _send_deltas(self, deltas: list[RequestDelta]) -> None:
        by_gateway: dict[bytes, list[RequestDelta]] = defaultdict(list)
        for delta in deltas:
            gateway = self.owner_of.get(delta.request_id)
            if gateway is None:
                self.delta_seq_of.pop(delta.request_id, None)
                continue
            delta.seq = self.delta_seq_of[delta.request_id] = self.delta_seq_of.get(delta.request_id, 0) + 1
            by_gateway[gateway].append(delta)
            if delta.request_finished:
                del self.owner_of[delta.request_id]
                del self.delta_seq_of[delta.request_id]
        for gateway, gateway_deltas in by_gateway.items():
            self._send(gateway, RequestDeltas(deltas=gateway_deltas))

    def _fail_requests(self, request_ids: list[str], status_code: int, message: str) -> None:
        """End requests with an error for their clients, freeing what they hold."""
        if self.core is not None:
            self.core.abort_requests(request_ids)  # its "abort" deltas are replaced by the errors
        for request_id in request_ids:
            self._send_error(request_id, status_code, message)

    def _send_error(self, request_id: str, status_code: int, message: str) -> None:
        self.delta_seq_of.pop(request_id, None)
        gateway = self.owner_of.pop(request_id, None)
        if gateway is not None:
            self._send(gateway, RequestError(request_id, status_code, message, retry_after_s=5.0))

    def _send(self, identity: bytes, message: msgspec.Struct) -> None:
        self.gateways.send_multipart([identity, *encode(message)])

    # --- status ---------------------------------------------------------------------

    def info(self, query: InfoQuery) -> SchedulerInfo:
        """Counts only, each O(1) but the step statistics (a fixed window) and the asked ids:
        cheap enough for every health check, scrape and stalled request."""
        core = self.core
        pool = core.block_pool if core else None
        return SchedulerInfo(
            query_id=query.query_id,
            replica_id=self.config.replica_id,
            model=self.last_executor.ready.model if self.last_executor else "",
            max_model_len=core.config.max_model_len if core else 0,
            num_executors_alive=sum(e.alive for e in self._executor_statuses(time.monotonic())),
            num_running=core.num_running if core else 0,
            num_waiting=core.num_waiting if core else 0,
            num_swapped=core.num_swapped if core else 0,
            num_blocks=pool.num_blocks if pool else 0,
            num_used_blocks=pool.num_used_blocks if pool else 0,
            num_free_blocks=pool.num_free_blocks if pool else 0,
            kv_utilisation=core.kv_utilisation() if core else 0.0,
            steps=self._step_stats(),
            # Held until the core flags the request's last delta (or it fails with an error).
            held_request_ids=[request_id for request_id in query.request_ids if request_id in self.owner_of],
        )

    def snapshot(self, query_id: int) -> StatusSnapshot:
        """Everything, every block's owner included: for the admin page only."""
        now = time.monotonic()
        core = self.core
        return StatusSnapshot(
            query_id=query_id,
            model=self.last_executor.ready.model if self.last_executor else "",
            max_model_len=core.config.max_model_len if core else 0,
            running=[request_status(r) for r in core.running] if core else [],
            waiting=[request_status(r) for r in core.waiting] if core else [],
            swapped=[request_status(r) for r in core.swapped] if core else [],
            block_pool=block_pool_status(core) if core else None,
            executors=self._executor_statuses(now),
            steps=self._step_stats(),
            uptime_s=now - self.started_at,
            num_executors_lost=self.num_executors_lost,
            executor_events=list(self.executor_events),
        )

    def _executor_statuses(self, now: float) -> list[ExecutorStatus]:
        if self.executor is None:
            return []
        return self.executor.statuses(now, self.config.heartbeat_timeout_s)

    def _step_stats(self) -> StepStats:
        core = self.core
        return self.history.stats(core.num_preemptions_total) if core else StepStats(0, 0.0, 0.0, 0.0, 0)


def advertised_gateway_address(config: SchedulerServiceConfig) -> str:
    """The address gateways discover in Redis: a wildcard bind is no address to connect to."""
    if config.advertise_address:
        return config.advertise_address
    address = config.gateway_address
    for wildcard in ("://*:", "://0.0.0.0:"):
        if wildcard in address:
            return address.replace(wildcard, f"://{socket.gethostname()}:")
    return address


def serve(config: SchedulerServiceConfig, stop_event: threading.Event | None = None) -> None:
    stop_event = stop_event or threading.Event()
    service = SchedulerService(config)
    log.info("scheduler: gateways on %s, executors on %s", config.gateway_address, config.executor_address)
    try:
        service.run(stop_event)
    finally:
        service.close()
