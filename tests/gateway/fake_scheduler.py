"""A scripted stand-in for the scheduler: a real ZeroMQ ROUTER in a thread, speaking the
real wire protocol (shared/messages.py + shared/transport.py).

Each step it sends every active request its next scripted tokens, like a scheduler
running one decode step for its batch. A submit with `n > 1` runs the script once per
sample (each with `for_sample(i)`'s params), reported under the request's id with the
sample's `sample_index`, as the real scheduler's forked samples are; like the real core,
it flags the last delta of a request (`request_finished`) once every sample has ended or
an abort ended them. It answers info queries (counts, and which of the asked ids it
holds) and full status queries, counting each kind. Tests set `script` (tokens per step
for a submit), `refuse` (answer submits with a RequestError), `answer_status` (answer
queries of either kind), `hold` (accept requests but produce nothing) and `drop_submits`
(forget them), and wait on what it received with deadlines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq

from pagedserve.shared.messages import (
    AbortRequest,
    BlockPoolStatus,
    GatewayHeartbeat,
    ExecutorStatus,
    GatewayMessage,
    InfoQuery,
    RequestDelta,
    RequestDeltas,
    RequestError,
    RequestSummary,
    SchedulerInfo,
    StatusQuery,
    StatusSnapshot,
    StepStats,
    SubmitRequest,
    TokenLogprobs,
)
from pagedserve.shared.sequence_ids import sample_sequence_id
from pagedserve.shared.transport import decode, encode

# (steps of new token ids, finish reason once the steps run out)
Script = Callable[[SubmitRequest], tuple[list[list[int]], str]]


def one_token_per_step(token_ids: list[int]) -> Script:
    """Emit `token_ids` one per step, cut at max_tokens ("length"), else "stop"."""

    def script(submit: SubmitRequest) -> tuple[list[list[int]], str]:
        limit = submit.sampling_params.max_tokens
        steps = [[t] for t in token_ids[:limit]]
        return steps, "length" if len(token_ids) >= limit else "stop"

    return script


@dataclass
class _Active:
    identity: bytes
    submit: SubmitRequest
    sample_index: int
    steps: list[list[int]]
    finish_reason: str
    num_sent: int = 0

    @property
    def sample_id(self) -> str:
        """The id the real scheduler gives a forked sample (f"{id}#{i}")."""
        return sample_sequence_id(self.submit.request_id, self.sample_index)


class FakeScheduler:
    def __init__(self, max_model_len: int = 256, step_interval_s: float = 0.002) -> None:
        self.max_model_len = max_model_len
        self.step_interval_s = step_interval_s
        self.script: Script = one_token_per_step([])
        self.refuse: RequestError | None = None  # request_id is filled in per submit
        self.answer_status = True
        self.hold = False
        self.drop_submits = False  # take submits and forget them, like a restarted scheduler
        self.executor_alive = True
        self.num_cached_tokens = 0
        self.submits: list[SubmitRequest] = []
        self.aborted: list[str] = []
        self.aborted_samples: list[tuple[str, int]] = []  # (request id, sample index) of per-sample aborts
        self.num_heartbeats = 0
        self.num_status_queries = 0  # full snapshots asked for
        self.num_info_queries = 0
        self._active: dict[str, _Active] = {}  # by sample id
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._run, name="fake-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        self._context.term()

    def reset(self) -> None:
        with self._changed:
            self.script = one_token_per_step([])
            self.refuse = None
            self.answer_status = True
            self.hold = False
            self.drop_submits = False
            self.executor_alive = True
            self.num_cached_tokens = 0
            self.submits.clear()
            self.aborted.clear()
            self.aborted_samples.clear()
            self.num_status_queries = 0
            self.num_info_queries = 0
            self._active.clear()

    def forget_all(self) -> None:
        """Drop every active request silently, as a scheduler that restarted would."""
        with self._changed:
            self._active.clear()

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fake scheduler: timed out waiting for {what}")
                self._changed.wait(remaining)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder(GatewayMessage)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(int(self.step_interval_s * 1000) + 1):
                while self._socket.poll(0, zmq.POLLIN):
                    identity, *frames = self._socket.recv_multipart()
                    message = decode(frames, decoder, peer="gateway")
                    if message is not None:
                        self._handle(identity, message)
            if not self.hold:
                self._step()

    def _handle(self, identity: bytes, message: SubmitRequest | AbortRequest | StatusQuery | InfoQuery | GatewayHeartbeat) -> None:
        with self._changed:
            if isinstance(message, GatewayHeartbeat):
                self.num_heartbeats += 1
            elif isinstance(message, SubmitRequest):
                self.submits.append(message)
                if self.refuse is not None:
                    error = msgspec.structs.replace(self.refuse, request_id=message.request_id)
                    self._socket.send_multipart([identity, *encode(error)])
                elif not self.drop_submits:
                    for sample_index in range(message.sampling_params.n):
                        sample = msgspec.structs.replace(message, sampling_params=message.sampling_params.for_sample(sample_index))
                        steps, finish_reason = self.script(sample)
                        active = _Active(identity, message, sample_index, steps, finish_reason)
                        self._active[active.sample_id] = active
            elif isinstance(message, AbortRequest):
                self.aborted.extend(message.request_ids)
                self.aborted_samples.extend((r, i) for r in message.request_ids for i in message.sample_indices)
                for request_id in message.request_ids:
                    # As the real scheduler does: every sample still running (or those
                    # named), a final "abort" delta.
                    aborted = [
                        a for a in self._active.values() if a.submit.request_id == request_id
                        and (not message.sample_indices or a.sample_index in message.sample_indices)
                    ]
                    for active in aborted:
                        del self._active[active.sample_id]
                    deltas = [RequestDelta(request_id, [], finish_reason="abort", sample_index=a.sample_index) for a in aborted]
                    if deltas:
                        self._socket.send_multipart([identity, *encode(RequestDeltas(self._mark_request_ends(deltas)))])
            elif self.answer_status:
                if isinstance(message, InfoQuery):
                    self.num_info_queries += 1
                    self._socket.send_multipart([identity, *encode(self._info(message))])
                else:
                    self.num_status_queries += 1
                    self._socket.send_multipart([identity, *encode(self._snapshot(message.query_id))])
            self._changed.notify_all()

    def _step(self) -> None:
        with self._changed:
            by_gateway: dict[bytes, list[RequestDelta]] = {}
            for sample_id, active in list(self._active.items()):
                step = active.steps[active.num_sent] if active.num_sent < len(active.steps) else []
                active.num_sent += 1
                done = active.num_sent >= len(active.steps)
                logprobs = []
                if active.submit.sampling_params.logprobs is not None:
                    k = active.submit.sampling_params.logprobs
                    logprobs = [TokenLogprobs(-0.5, [t, *range(1000, 1000 + k - 1)][:k], [-0.5 - i for i in range(k)]) for t in step]
                by_gateway.setdefault(active.identity, []).append(
                    RequestDelta(
                        active.submit.request_id, step, logprobs, active.finish_reason if done else None,
                        self.num_cached_tokens, active.sample_index,
                    )
                )
                if done:
                    del self._active[sample_id]
            for identity, deltas in by_gateway.items():
                self._socket.send_multipart([identity, *encode(RequestDeltas(self._mark_request_ends(deltas)))])
            if by_gateway:
                self._changed.notify_all()

    def _mark_request_ends(self, deltas: list[RequestDelta]) -> list[RequestDelta]:
        """As the real core does: flag the last delta of each request none of whose samples
        is still active."""
        alive = {active.submit.request_id for active in self._active.values()}
        ended: set[str] = set()
        for delta in reversed(deltas):
            if delta.finish_reason is not None and delta.request_id not in alive and delta.request_id not in ended:
                ended.add(delta.request_id)
                delta.request_finished = True
        return deltas

    def _info(self, query: InfoQuery) -> SchedulerInfo:
        held = {active.submit.request_id for active in self._active.values()}
        return SchedulerInfo(
            query_id=query.query_id,
            replica_id="replica-fake",
            model="SmolLM2-135M-Instruct",
            max_model_len=self.max_model_len,
            num_executors_alive=1 if self.executor_alive else 0,
            num_running=len(self._active),
            num_waiting=0,
            num_swapped=0,
            num_blocks=8,  # the snapshot's pool: 3 of 8 blocks used
            num_used_blocks=3,
            num_free_blocks=5,
            kv_utilisation=40 / 48,
            steps=StepStats(10, 100.0, 1.5, 1.5, 0),
            held_request_ids=[request_id for request_id in query.request_ids if request_id in held],
        )

    def _snapshot(self, query_id: int) -> StatusSnapshot:
        def status(active: _Active) -> RequestSummary:
            submit = active.submit
            return RequestSummary(
                active.sample_id, "running", len(submit.prompt_token_ids), active.num_sent, len(submit.prompt_token_ids),
                submit.sampling_params.max_tokens, 0, submit.arrival_time, [0],
                parent_request_id=submit.request_id if active.sample_index else None,
            )

        return StatusSnapshot(
            query_id=query_id,
            model="SmolLM2-135M-Instruct",
            max_model_len=self.max_model_len,
            running=[status(a) for a in self._active.values()],
            waiting=[],
            swapped=[],
            block_pool=BlockPoolStatus(8, 16, 5, 3, 1, 1, 40, 48, 40 / 48, ["req-a", "req-a", "*", "", "", "", "", ""]),
            executors=[ExecutorStatus("executor-0", "cpu", 8, "SmolLM2-135M-Instruct", 0.1, self.executor_alive)],
            steps=StepStats(10, 100.0, 1.5, 1.5, 0),
            uptime_s=1.0,
        )
