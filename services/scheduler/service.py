"""The scheduler process: the pure scheduler core behind two ZeroMQ ROUTER sockets.

One loop, no threads: poll the gateway and executor sockets, apply what arrived (new
requests, aborts, status queries, executor capacity, step results), and whenever no step
is in flight and work is pending, schedule the next step and send it. Everything it does
between polls is in-memory; Redis mirroring happens on its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from services.scheduler.redis_mirror import RedisMirror
from services.scheduler.request import Request
from services.scheduler.scheduler import QueueFullError, Scheduler, SchedulerConfig
from services.scheduler.status import StepHistory, block_pool_status, executor_status, request_status
from shared.messages import (
    AbortRequest,
    ExecuteStep,
    ExecutorMessage,
    ExecutorReady,
    GatewayMessage,
    Heartbeat,
    RequestDelta,
    RequestDeltas,
    RequestError,
    StatusQuery,
    StatusSnapshot,
    StepMessage,
    StepResultMessage,
    StepStats,
    SubmitRequest,
)
from shared.transport import decode, encode, make_socket

log = logging.getLogger("pagedserve.scheduler")


class SchedulerServiceConfig(msgspec.Struct, forbid_unknown_fields=True):
    gateway_address: str = "tcp://127.0.0.1:5555"  # bound: gateways connect here
    executor_address: str = "tcp://127.0.0.1:5556"  # bound: executors connect here
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_num_waiting: int = 1024
    executor_timeout_s: float = 5.0  # no heartbeat for this long: the executor is dead
    redis_url: str | None = None
    replica_id: str = "replica-0"


@dataclass
class _Executor:
    identity: bytes
    ready: ExecutorReady
    last_heard: float  # monotonic


class SchedulerService:
    def __init__(self, config: SchedulerServiceConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.gateways = make_socket(self.context, zmq.ROUTER)
        self.gateways.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.gateways.bind(config.gateway_address)
        self.executors = make_socket(self.context, zmq.ROUTER)
        self.executors.bind(config.executor_address)
        self.core: Scheduler | None = None  # sized by the first executor's capacity
        self.executor: _Executor | None = None
        self.in_flight: ExecuteStep | None = None
        self.owner_of: dict[str, bytes] = {}  # request id -> gateway identity
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
            self._maybe_step()
            self._maybe_report_load()

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        self.gateways.close()
        self.executors.close()

    @staticmethod
    def _drain(sock: zmq.Socket[Any], handle: Any) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _maybe_step(self) -> None:
        if self.in_flight is not None or self.core is None or self.executor is None:
            return
        if not self.core.has_unfinished_requests():
            return
        step = self.core.schedule()
        if not step.num_scheduled_tokens:
            return  # nothing fits this instant (cannot happen for validated requests)
        self.in_flight = step
        self.executors.send_multipart([self.executor.identity, *encode(StepMessage(step=step))])
        if self.redis is not None:
            for new in step.new_requests:
                if new.num_computed_tokens == 0 and len(new.token_ids) == new.num_prompt_tokens:
                    self.redis.update(f"req:{new.request_id}", {"status": "running", "scheduled_at": time.time()})

    def _maybe_report_load(self) -> None:
        """Replica heartbeat and load, once a second, for gateways that route by load."""
        now = time.monotonic()
        if self.redis is None or now < self._next_load_report:
            return
        self._next_load_report = now + 1.0
        core = self.core
        self.redis.update(
            f"replica:{self.config.replica_id}",
            {
                "heartbeat_at": time.time(),
                "gateway_address": self.config.gateway_address,
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
            self._on_executor_ready(identity, message, now)
        elif isinstance(message, Heartbeat):
            if self.executor is not None and self.executor.identity == identity:
                self.executor.last_heard = now
        elif isinstance(message, StepResultMessage):
            if self.executor is not None and self.executor.identity == identity:
                self.executor.last_heard = now
            self._on_step_result(message)

    def _on_executor_ready(self, identity: bytes, ready: ExecutorReady, now: float) -> None:
        if self.core is None:
            self.core = Scheduler(
                SchedulerConfig(
                    max_model_len=ready.max_model_len,
                    max_num_seqs=self.config.max_num_seqs,
                    max_num_batched_tokens=self.config.max_num_batched_tokens,
                    max_num_waiting=self.config.max_num_waiting,
                ),
                num_blocks=ready.num_blocks,
                block_size=ready.block_size,
            )
            log.info(
                "executor %s ready: %s on %s, %d blocks of %d tokens", ready.executor_id, ready.model,
                ready.device, ready.num_blocks, ready.block_size,
            )
        elif ready.num_blocks < self.core.block_pool.num_blocks or ready.block_size != self.core.block_pool.block_size:
            log.error("executor %s has a smaller KV cache than the pool: ignored", ready.executor_id)
            return
        self.executor = _Executor(identity=identity, ready=ready, last_heard=now)

    def _on_step_result(self, message: StepResultMessage) -> None:
        step = self.in_flight
        if step is None or self.core is None or message.result.step_id != step.step_id:
            log.warning("dropped a result for step %d: not the step in flight", message.result.step_id)
            return
        self.in_flight = None
        deltas = self.core.update_from_output(step, message.result)
        self.history.record(time.monotonic(), len(step.num_scheduled_tokens), sum(step.num_scheduled_tokens))
        self._send_deltas(deltas)

    # --- gateways -------------------------------------------------------------------

    def _on_gateway_frames(self, frames: list[bytes]) -> None:
        identity, payload = frames[0], frames[1:]
        message = decode(payload, self._gateway_decoder, peer=f"gateway {identity!r}")
        if isinstance(message, SubmitRequest):
            self._on_submit(identity, message)
        elif isinstance(message, AbortRequest):
            if self.core is not None:
                self._send_deltas(self.core.abort_requests(message.request_ids))
        elif isinstance(message, StatusQuery):
            self._send(identity, self.snapshot(message.query_id))

    def _on_submit(self, identity: bytes, submit: SubmitRequest) -> None:
        if self.core is None:
            self._send(identity, RequestError(submit.request_id, 503, "no executor has joined this scheduler yet", 1.0))
            return
        try:
            submit.sampling_params.validate()
            self.core.add_request(
                Request(
                    submit.request_id,
                    submit.prompt_token_ids,
                    submit.sampling_params,
                    arrival_time=submit.arrival_time,
                    eos_token_id=self.executor.ready.eos_token_id if self.executor else None,
                    priority=submit.priority,
                )
            )
        except QueueFullError as error:
            self._send(identity, RequestError(submit.request_id, 429, str(error), 1.0))
            return
        except ValueError as error:
            self._send(identity, RequestError(submit.request_id, 400, str(error)))
            return
        self.owner_of[submit.request_id] = identity
        if self.redis is not None:
            self.redis.update(
                f"req:{submit.request_id}",
                {"status": "waiting", "replica_id": self.config.replica_id, "arrival_at": submit.arrival_time,
                 "prompt_tokens": len(submit.prompt_token_ids)},
            )

    def _send_deltas(self, deltas: list[RequestDelta]) -> None:
        by_gateway: dict[bytes, list[RequestDelta]] = defaultdict(list)
        for delta in deltas:
            owner = self.owner_of.get(delta.request_id)
            if owner is None:
                continue
            by_gateway[owner].append(delta)
            if delta.finish_reason is not None:
                del self.owner_of[delta.request_id]
                self._mirror_finish(delta)
        for owner, owned in by_gateway.items():
            self._send(owner, RequestDeltas(deltas=owned))

    def _mirror_finish(self, delta: RequestDelta) -> None:
        if self.redis is None or self.core is None:
            return
        fields: dict[str, object] = {"status": "finished", "finish_reason": delta.finish_reason or "", "finished_at": time.time()}
        self.redis.update(f"req:{delta.request_id}", fields, expire=True)

    def _send(self, identity: bytes, message: msgspec.Struct) -> None:
        self.gateways.send_multipart([identity, *encode(message)])

    # --- status ---------------------------------------------------------------------

    def snapshot(self, query_id: int) -> StatusSnapshot:
        now = time.monotonic()
        executors = []
        if self.executor is not None:
            ready = self.executor.ready
            executors.append(
                executor_status(
                    ready.executor_id, ready.device, ready.num_blocks, ready.model,
                    now - self.executor.last_heard, self.config.executor_timeout_s,
                )
            )
        core = self.core
        return StatusSnapshot(
            query_id=query_id,
            model=self.executor.ready.model if self.executor else "",
            max_model_len=core.config.max_model_len if core else 0,
            running=[request_status(r) for r in core.running] if core else [],
            waiting=[request_status(r) for r in core.waiting] if core else [],
            swapped=[],
            block_pool=block_pool_status(core) if core else None,
            executors=executors,
            steps=self.history.stats(core.num_preemptions_total) if core else StepStats(0, 0.0, 0.0, 0.0, 0),
            uptime_s=now - self.started_at,
        )


def serve(config: SchedulerServiceConfig, stop_event: threading.Event | None = None) -> None:
    stop_event = stop_event or threading.Event()
    service = SchedulerService(config)
    log.info("scheduler: gateways on %s, executors on %s", config.gateway_address, config.executor_address)
    try:
        service.run(stop_event)
    finally:
        service.close()
