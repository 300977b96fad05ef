"""Continuous batching over a paged KV cache: which requests run next, with how many
tokens each, in which blocks.

Pure policy: no sockets, no tensors. The service loop calls, one step in flight at a time:

    step = scheduler.schedule()                       # -> executor
    deltas = scheduler.update_from_output(step, result)  # <- executor, -> clients

with `add_request` / `abort_requests` in between as messages arrive.

Scheduling is unified as in vLLM v1: a request has `num_tokens` (prompt + output) and
`num_computed_tokens` (K/V in the cache); a step computes up to the difference, capped by
what is left of the step's token budget. A long prompt is thereby split into chunks
(chunked prefill), a decode is a 1-token step, and a request resumed after preemption
simply recomputes prompt + output. A request samples a token in a step exactly when the
step brings `num_computed_tokens` up to `num_tokens`; the executor applies the same rule.

Who owns a block: the request whose `block_ids` lists it, from `schedule()` allocating it
until the request finishes, is aborted or is preempted, which all free it at once. So when
no request is alive, every block is free.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import msgspec

from services.scheduler.block_pool import BlockPool
from services.scheduler.request import Request, RequestStatus
from shared.messages import (
    CachedRequestData,
    ExecuteStep,
    NewRequestData,
    RequestDelta,
    SampledToken,
    StepResult,
    TokenLogprobs,
)


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the gateway answers 429 with Retry-After."""

    def __init__(self, num_waiting: int, max_num_waiting: int) -> None:
        self.num_waiting = num_waiting
        self.max_num_waiting = max_num_waiting
        super().__init__(
            f"waiting queue is full ({num_waiting:,} of {max_num_waiting:,} requests): "
            "retry later"
        )


class SchedulerConfig(msgspec.Struct, kw_only=True, frozen=True):
    max_model_len: int  # prompt + output tokens of one request
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens computed in one step, over all requests
    max_num_waiting: int = 1024  # bound of the waiting queue

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_num_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def max_num_running(self) -> int:
        """The sequence cap actually applied. Running requests are scheduled in admission
        order and each decode costs one token: with more running requests than budget,
        the ones at the back would not decode until the front ones finished. Capping at
        the budget keeps every running request in every step."""
        return min(self.max_num_seqs, self.max_num_batched_tokens)


# --- policy, as small pure functions ------------------------------------------------


def blocks_to_cover(num_tokens: int, block_size: int) -> int:
    """Blocks a block table needs to hold `num_tokens` slots (ceil division)."""
    return -(-num_tokens // block_size)


def num_tokens_to_schedule(req: Request, token_budget: int) -> int:
    """Everything not yet computed, as far as the step's budget reaches: a whole prompt,
    a chunk of one, or the single token of a decode."""
    return min(req.num_tokens - req.num_computed_tokens, token_budget)


def peak_kv_tokens(req: Request, max_model_len: int) -> int:
    """The most K/V slots the request can ever hold at once: its final length minus one,
    since the last sampled token is never fed back through the model."""
    final_len = min(req.num_prompt_tokens + req.sampling_params.max_tokens, max_model_len)
    return final_len - 1


def waiting_order_key(req: Request) -> tuple[int, int, float, int]:
    """Admission order: priority first (lower = sooner); within a priority, requests that
    were preempted go first (they already held a place and may be streaming), then FCFS."""
    was_preempted = req.num_preemptions > 0
    return (req.priority, 0 if was_preempted else 1, req.arrival_time, req.arrival_seq)


def preemption_order_key(req: Request) -> tuple[int, float, int]:
    """The largest key is preempted first: least important, then latest to arrive."""
    return (req.priority, req.arrival_time, req.arrival_seq)


def pick_preemption_victim(candidates: Sequence[Request]) -> Request:
    return max(candidates, key=preemption_order_key)


def stop_status(req: Request, token_id: int, max_model_len: int) -> RequestStatus | None:
    """Whether `token_id`, just appended to `req`'s output, ends the request."""
    params = req.sampling_params
    if token_id in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if token_id == req.eos_token_id and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED
    if req.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if req.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def validate_request(req: Request, max_model_len: int, num_blocks: int, block_size: int) -> None:
    """Reject, with numbers, a request that could never run to completion.

    The KV check uses the request's peak footprint, not just its prompt: a request that
    outgrows the whole pool would preempt itself forever once it runs alone."""
    num_prompt = req.num_prompt_tokens
    if num_prompt == 0:
        raise ValueError(f"request {req.request_id}: the prompt is empty")
    if num_prompt >= max_model_len:
        raise ValueError(
            f"request {req.request_id}: the prompt has {num_prompt:,} tokens but "
            f"max_model_len is {max_model_len:,} (prompt + output): at most "
            f"{max_model_len - 1:,} prompt tokens leave room for one generated token"
        )
    peak = peak_kv_tokens(req, max_model_len)
    if blocks_to_cover(peak, block_size) > num_blocks:
        raise ValueError(
            f"KV cache holds {num_blocks:,} blocks ({num_blocks * block_size:,} tokens) but "
            f"request {req.request_id} needs {peak:,} ({num_prompt:,} prompt + "
            f"{peak - num_prompt:,} generated): shorten the prompt, lower max_tokens, or "
            "raise --kv-cache-memory"
        )


def _token_logprobs(token: SampledToken) -> list[TokenLogprobs]:
    if token.logprob is None:
        return []
    return [TokenLogprobs(token.logprob, token.top_token_ids, token.top_logprobs)]


# --- the scheduler ------------------------------------------------------------------


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int) -> None:
        self.config = config
        self._block_pool = BlockPool(num_blocks, block_size)
        self._requests: dict[str, Request] = {}  # alive: waiting or running
        self._waiting: list[Request] = []  # sorted by waiting_order_key
        self._running: list[Request] = []  # admission order = scheduling order
        # Requests the executor mirrors and must forget before the next step.
        self._finished_ids: list[str] = []
        self._next_step_id = 0
        self._next_arrival_seq = 0
        self._num_preemptions_total = 0

    # --- requests in and out --------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Queue a new request. ValueError if it can never run (permanent: 400),
        QueueFullError if the waiting queue is at its bound (transient: 429)."""
        if req.request_id in self._requests:
            raise ValueError(f"request {req.request_id} is already queued or running")
        if req.status != RequestStatus.WAITING or req.block_ids or req.num_computed_tokens:
            raise ValueError(f"request {req.request_id} is not fresh: {req!r}")
        validate_request(
            req, self.config.max_model_len, self._block_pool.num_blocks, self._block_pool.block_size
        )
        if len(self._waiting) >= self.config.max_num_waiting:
            raise QueueFullError(len(self._waiting), self.config.max_num_waiting)
        req.arrival_seq = self._next_arrival_seq
        self._next_arrival_seq += 1
        self._requests[req.request_id] = req
        bisect.insort(self._waiting, req, key=waiting_order_key)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestDelta]:
        """Abort now, freeing blocks at once. Unknown or already finished ids are ignored
        (an abort can race a natural finish). Returns an "abort" delta per request that
        was still alive."""
        deltas: list[RequestDelta] = []
        for request_id in request_ids:
            req = self._requests.get(request_id)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self._running.remove(req)
            else:
                self._waiting.remove(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            deltas.append(RequestDelta(request_id, [], finish_reason=req.finish_reason))
        return deltas

    # --- one step -------------------------------------------------------------------

    def schedule(self) -> ExecuteStep:
        """Decide the next step: running requests first (so decodes are never starved by
        a long prompt), then admissions from the waiting queue with what budget, sequence
        slots and blocks are left."""
        token_budget = self.config.max_num_batched_tokens
        num_preemptions_before = self._num_preemptions_total
        cached_requests, cached_counts = self._schedule_running(token_budget)
        token_budget -= sum(cached_counts)
        new_requests: list[NewRequestData] = []
        new_counts: list[int] = []
        # Admission never preempts, and after a preemption the pool is known to be tight:
        # admitting now would only set up the next preemption.
        if self._num_preemptions_total == num_preemptions_before:
            new_requests, new_counts = self._admit_waiting(token_budget)

        finished_ids, self._finished_ids = self._finished_ids, []
        step = ExecuteStep(
            step_id=self._next_step_id,
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=new_counts + cached_counts,
            finished_request_ids=finished_ids,
        )
        self._next_step_id += 1
        return step

    def update_from_output(self, step: ExecuteStep, result: StepResult) -> list[RequestDelta]:
        """Apply a step's result: advance each request by its scheduled tokens, append the
        sampled ones, finish those that hit a stop condition (freeing their blocks now).
        Requests aborted while the step ran are skipped. Returns one delta per request
        that got a token."""
        if result.step_id != step.step_id:
            raise ValueError(f"result of step {result.step_id} applied to step {step.step_id}")
        sampled = {token.request_id: token for token in result.sampled}
        scheduled_ids = [r.request_id for r in step.new_requests] + [
            r.request_id for r in step.cached_requests
        ]

        # Check the whole result before changing anything: a result that disagrees with
        # the step means the executor's mirror has drifted, and half-applying it would
        # only make that worse.
        updates: list[tuple[Request, int, SampledToken | None]] = []
        for request_id, num_scheduled in zip(scheduled_ids, step.num_scheduled_tokens):
            token = sampled.pop(request_id, None)
            req = self._requests.get(request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted after the step was scheduled
            samples = req.num_computed_tokens + num_scheduled == req.num_tokens
            if samples and token is None:
                raise ValueError(f"step {step.step_id}: request {request_id} sampled nothing")
            if token is not None and not samples:
                raise ValueError(
                    f"step {step.step_id}: request {request_id} sampled a token in the "
                    "middle of its prompt"
                )
            updates.append((req, num_scheduled, token))
        if sampled:
            raise ValueError(
                f"step {step.step_id}: tokens sampled for requests not in the step: "
                f"{sorted(sampled)}"
            )

        deltas: list[RequestDelta] = []
        any_finished = False
        for req, num_scheduled, token in updates:
            req.num_computed_tokens += num_scheduled
            if token is None:
                continue
            req.output_token_ids.append(token.token_id)
            status = stop_status(req, token.token_id, self.config.max_model_len)
            if status is not None:
                self._finish(req, status)
                any_finished = True
            deltas.append(
                RequestDelta(
                    req.request_id,
                    [token.token_id],
                    _token_logprobs(token),
                    finish_reason=req.finish_reason,
                )
            )
        if any_finished:
            self._running = [r for r in self._running if not r.is_finished]
        return deltas

    # --- introspection (admin status page, tests) ------------------------------------

    @property
    def block_pool(self) -> BlockPool:
        return self._block_pool

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        """In scheduling (admission) order."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        """In admission order."""
        return tuple(self._waiting)

    @property
    def num_preemptions_total(self) -> int:
        return self._num_preemptions_total

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def get_request(self, request_id: str) -> Request | None:
        """A waiting or running request; None once it has finished."""
        return self._requests.get(request_id)

    def kv_utilisation(self) -> float:
        """Tokens whose K/V are stored / slots allocated, over running requests: what
        on-demand allocation wins over reserving max_model_len per sequence. 0.0 when
        nothing is allocated."""
        num_slots = sum(len(r.block_ids) for r in self._running) * self._block_pool.block_size
        if num_slots == 0:
            return 0.0
        return sum(r.num_computed_tokens for r in self._running) / num_slots

    # --- private --------------------------------------------------------------------

    def _schedule_running(self, token_budget: int) -> tuple[list[CachedRequestData], list[int]]:
        """Give each running request, in admission order, what it still needs within the
        budget, preempting when the pool runs dry."""
        cached_requests: list[CachedRequestData] = []
        counts: list[int] = []
        index = 0  # self._running[:index] are scheduled in this step
        while index < len(self._running) and token_budget > 0:
            req = self._running[index]
            num_new = num_tokens_to_schedule(req, token_budget)
            num_new_blocks = self._num_new_blocks(req, num_new)
            if not self._make_room(index, num_new_blocks):
                continue  # req itself was preempted; self._running[index] is the next one
            num_blocks_before = len(req.block_ids)
            req.block_ids.extend(self._block_pool.allocate(num_new_blocks))
            cached_requests.append(
                CachedRequestData(
                    req.request_id, req.block_ids[num_blocks_before:], req.num_computed_tokens
                )
            )
            counts.append(num_new)
            token_budget -= num_new
            index += 1
        return cached_requests, counts

    def _admit_waiting(self, token_budget: int) -> tuple[list[NewRequestData], list[int]]:
        """Admit from the head of the waiting queue while budget, sequence slots and free
        blocks allow. A request resumed after preemption recomputes prompt + output."""
        new_requests: list[NewRequestData] = []
        counts: list[int] = []
        while (
            self._waiting
            and token_budget > 0
            and len(self._running) < self.config.max_num_running
        ):
            req = self._waiting[0]
            num_new = num_tokens_to_schedule(req, token_budget)
            num_new_blocks = self._num_new_blocks(req, num_new)
            if num_new_blocks > self._block_pool.num_free_blocks:
                break  # FCFS: nobody overtakes the head of the queue
            self._waiting.pop(0)
            req.block_ids.extend(self._block_pool.allocate(num_new_blocks))
            req.status = RequestStatus.RUNNING
            self._running.append(req)
            new_requests.append(
                NewRequestData(
                    request_id=req.request_id,
                    token_ids=req.all_token_ids,
                    num_prompt_tokens=req.num_prompt_tokens,
                    block_ids=list(req.block_ids),
                    num_computed_tokens=req.num_computed_tokens,
                    sampling_params=req.sampling_params,
                )
            )
            counts.append(num_new)
            token_budget -= num_new
        return new_requests, counts

    def _num_new_blocks(self, req: Request, num_new_tokens: int) -> int:
        """Blocks to append so the table covers the tokens computed after this step; 0
        until the last block is full (waste stays under one block per request)."""
        num_covered = req.num_computed_tokens + num_new_tokens
        return blocks_to_cover(num_covered, self._block_pool.block_size) - len(req.block_ids)

    def _make_room(self, index: int, num_blocks: int) -> bool:
        """Preempt running requests not yet scheduled in this step (`self._running[index:]`)
        until `num_blocks` are free for `self._running[index]`. False if that request was
        itself the victim."""
        req = self._running[index]
        while self._block_pool.num_free_blocks < num_blocks:
            victim = pick_preemption_victim(self._running[index:])
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        """Preempt by recompute: drop its K/V, keep its output, requeue it. It resumes as
        a NewRequestData with prompt + output and recomputes them all."""
        self._running.remove(req)
        self._block_pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self._num_preemptions_total += 1
        bisect.insort(self._waiting, req, key=waiting_order_key)
        self._finished_ids.append(req.request_id)  # the executor drops its mirror

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Free everything a request holds. The caller takes it out of its queue."""
        if req.status == RequestStatus.RUNNING:
            self._finished_ids.append(req.request_id)  # waiting ones are not mirrored
        self._block_pool.free(req.block_ids)
        req.block_ids = []
        req.status = status
        del self._requests[req.request_id]
