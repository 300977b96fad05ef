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

Who owns a block: the requests whose `block_ids` list it, from `schedule()` allocating it
(or finding it in the prefix cache) until each finishes, is aborted or is preempted, which
all drop their references at once. So when no request is alive, no block is referenced:
every block is free, empty or holding a cached prefix that `allocate` may evict.

Prefix caching: when a block becomes full and computed it is registered under the hash of
its tokens and everything before them (`prefix_cache.py`); on admission a request (new or
resumed after preemption) takes the longest chain of cached blocks matching its tokens,
starts with `num_computed_tokens` past them, and computes only the rest. The executor needs
nothing more: a NewRequestData already says where computing starts.

Preemption by swap (`preemption_mode="swap"`): the victim's blocks are copied to the
executor's CPU swap pool (`ExecuteStep.swap_out`) and freed; it waits in the swapped queue,
holding swap blocks, and comes back, ahead of any waiting request, into fresh blocks copied
back from them (`ExecuteStep.swap_in`), as a NewRequestData that starts at its
`num_computed_tokens`: nothing is recomputed. A victim the swap pool cannot hold is
preempted by recompute instead.

Parallel sampling (`SamplingParams.n > 1`): one request computes the prompt; in the step
where it samples its first token, `ExecuteStep.forked_requests` forks samples 1 .. n-1 off
it (ids f"{id}#{i}", params `for_sample(i)`: seed + i), which sample their first tokens
from its logits and become requests of their own sharing its blocks (a reference each).
The first write into the shared, partly filled last block copies it (copy-on-write:
`ExecuteStep.block_copies`, done by the executor before the forward). Deltas report every
sample under the request's id with its `sample_index`; each sample finishes, and is
preempted (recompute or swap, as an ordinary request), on its own, and aborting the
request aborts them all.

Beam search (`SamplingParams.beam_width > 1`): the request is the first beam of a
`BeamGroup`. The executor never samples a beam; it reports the raw logprobs of each
beam's best next tokens, and once every live beam of the group has reported, the pure
policy in `beam_search.py` picks the next beams. A beam picked once takes its token in
place; one picked k times forks k - 1 new beams (`ExecuteStep.beam_forks`, ids
f"{id}#b{k}") that share its blocks exactly as parallel samples do, copy-on-write
included; a beam not picked is freed at once. Chosen tokens reach the executor in the
next CachedRequestData (`new_token_ids`). Nothing is streamed: when the search ends, the
best n hypotheses come back as n deltas (sample_index 0 .. n-1), each with all its
tokens. A beam waits, scheduled for nothing, while the rest of its group catches up; it
is preempted by recompute only (it then reports again), never swapped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import msgspec

from services.scheduler.beam_search import BeamSearchState, LiveBeam, select_beams
from services.scheduler.block_pool import BlockPool
from services.scheduler.config import SchedulerConfig
from services.scheduler.prefix_cache import PrefixCacheEvent, PrefixCacheStats, extend_block_hashes
from services.scheduler.request import BeamGroup, Request, RequestStatus
from shared.messages import (
    BeamFork,
    CachedRequestData,
    ExecuteStep,
    ForkedRequest,
    NewRequestData,
    RequestDelta,
    SampledToken,
    StepResult,
    TokenLogprobs,
)
from shared.sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the gateway answers 429 with Retry-After."""

    def __init__(self, num_waiting: int, max_num_waiting: int) -> None:
        self.num_waiting = num_waiting
        self.max_num_waiting = max_num_waiting
        super().__init__(
            f"waiting queue is full ({num_waiting:,} of {max_num_waiting:,} requests): "
            "retry later"
        )


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
    # A beam search runs its beams as a gang (admitted and preempted together); resumed
    # after a preemption, each beam recomputes into blocks of its own, so the group must
    # fit with nothing shared.
    width = req.sampling_params.beam_width
    if width * blocks_to_cover(peak, block_size) > num_blocks:
        beams = f" x {width} beams" if width > 1 else ""
        raise ValueError(
            f"KV cache holds {num_blocks:,} blocks ({num_blocks * block_size:,} tokens) but "
            f"request {req.request_id} needs {peak:,}{beams} ({num_prompt:,} prompt + "
            f"{peak - num_prompt:,} generated): shorten the prompt, lower max_tokens, or "
            "raise --kv-cache-memory"
        )


def new_request_data(req: Request) -> NewRequestData:
    """A request in full, for an executor that does not mirror it yet (first admission,
    resumption after recompute, or swap-in into fresh blocks). Every token goes with it,
    so a beam has none left unsent."""
    req.unsent_token_ids = []
    return NewRequestData(
        request_id=req.request_id,
        token_ids=req.all_token_ids,
        num_prompt_tokens=req.num_prompt_tokens,
        block_ids=list(req.block_ids),
        num_computed_tokens=req.num_computed_tokens,
        sampling_params=req.sampling_params,
    )


def _token_logprobs(token: SampledToken) -> list[TokenLogprobs]:
    if token.logprob is None:
        return []
    return [TokenLogprobs(token.logprob, token.top_token_ids, token.top_logprobs)]


# --- the scheduler ------------------------------------------------------------------


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        *,
        num_swap_blocks: int = 0,
        record_prefix_cache_events: bool = False,
    ) -> None:
        """`num_swap_blocks`: the executor's CPU swap pool, for preemption by swap (0: none,
        so every preemption recomputes). `record_prefix_cache_events`: keep the prefix-cache
        events for `take_prefix_cache_events` (only when something drains them, e.g. a Redis
        mirror)."""
        self.config = config
        self._block_pool = BlockPool(num_blocks, block_size, record_events=record_prefix_cache_events)
        self._hash_extra_keys = (config.model,)
        self._prefix_cache_stats = PrefixCacheStats()
        self._requests: dict[str, Request] = {}  # alive: waiting, running or swapped
        self._waiting: list[Request] = []  # sorted by waiting_order_key
        self._running: list[Request] = []  # admission order = scheduling order
        # Preemption by swap. The swap pool holds ids of the executor's swap blocks: no
        # prefix caching there (a swap block is read once, by the request that wrote it).
        self._swap_pool = BlockPool(num_swap_blocks, block_size) if num_swap_blocks > 0 else None
        self._swapped: list[Request] = []  # sorted by waiting_order_key
        # The (source, destination) block pairs of the step being scheduled.
        self._swap_out_pairs: list[tuple[int, int]] = []
        self._swap_in_pairs: list[tuple[int, int]] = []
        # Parallel sampling: copy-on-write pairs of the step being scheduled, and the
        # samples forked off each parent request still alive (for aborting them together).
        self._block_copies: list[tuple[int, int]] = []
        self._sample_ids: dict[str, list[str]] = {}
        # Beam search: the groups by client request id, and the beams forked in the last
        # update, for the next step to announce.
        self._beam_groups: dict[str, BeamGroup] = {}
        self._beam_forks: list[BeamFork] = []
        self._num_swap_outs_total = 0
        self._num_swap_ins_total = 0
        # Requests the executor mirrors and must forget before the next step.
        self._finished_ids: list[str] = []
        self._next_step_id = 0
        self._next_arrival_seq = 0
        self._num_preemptions_total = 0

    # --- requests in and out --------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Queue a new request. ValueError if it can never run (permanent: 400),
        QueueFullError if the waiting queue is at its bound (transient: 429)."""
        if req.request_id in self._requests or req.request_id in self._beam_groups:
            raise ValueError(f"request {req.request_id} is already queued or running")
        if req.status != RequestStatus.WAITING or req.block_ids or req.num_computed_tokens:
            raise ValueError(f"request {req.request_id} is not fresh: {req!r}")
        validate_request(
            req, self.config.max_model_len, self._block_pool.num_blocks, self._block_pool.block_size
        )
        num_sequences = max(req.sampling_params.n, req.sampling_params.beam_width)
        if num_sequences > self.config.max_num_running:
            params = req.sampling_params
            what = f"beam_width={params.beam_width} beams" if params.use_beam_search else f"n={params.n} samples"
            raise ValueError(
                f"request {req.request_id}: {what} but at most "
                f"{self.config.max_num_running} sequences run at once (max_num_seqs "
                f"{self.config.max_num_seqs}, max_num_batched_tokens {self.config.max_num_batched_tokens})"
            )
        if len(self._waiting) >= self.config.max_num_waiting:
            raise QueueFullError(len(self._waiting), self.config.max_num_waiting)
        req.arrival_seq = self._next_arrival_seq
        self._next_arrival_seq += 1
        if self.config.enable_prefix_caching:
            self._update_block_hashes(req)
        if req.sampling_params.use_beam_search:
            search = BeamSearchState.for_request(
                req.sampling_params, req.eos_token_id, req.num_prompt_tokens, self.config.max_model_len
            )
            req.beam = BeamGroup(req.request_id, search, req.sampling_params.n, beams=[req], scores=[0.0])
            self._beam_groups[req.request_id] = req.beam
        self._requests[req.request_id] = req
        bisect.insort(self._waiting, req, key=waiting_order_key)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestDelta]:
        """Abort now, freeing blocks at once. Unknown or already finished ids are ignored
        (an abort can race a natural finish). Returns an "abort" delta per request that
        was still alive. Aborting a request aborts all its samples (n > 1)."""
        deltas: list[RequestDelta] = []
        request_ids = list(request_ids)
        for request_id in request_ids:
            # A beam's own id stands for its whole search: a search cannot lose one beam.
            req = self._requests.get(request_id)
            group = self._beam_groups.pop(req.beam.client_request_id if req and req.beam else request_id, None)
            if group is None:
                continue
            for beam in group.beams:
                self._dequeue(beam)
                self._finish(beam, RequestStatus.FINISHED_ABORTED)
            deltas += [
                RequestDelta(
                    group.client_request_id, [], finish_reason="abort", num_cached_tokens=group.num_cached_tokens, sample_index=i
                )
                for i in range(group.n)
            ]
        for request_id in [i for request_id in request_ids for i in self._with_samples(request_id)]:
            req = self._requests.get(request_id)
            if req is None:
                continue
            self._dequeue(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            deltas.append(
                RequestDelta(
                    req.client_request_id,
                    [],
                    finish_reason=req.finish_reason,
                    num_cached_tokens=req.num_cached_tokens,
                    sample_index=req.sample_index,
                )
            )
        return self._mark_request_ends(deltas)

    def _mark_request_ends(self, deltas: list[RequestDelta]) -> list[RequestDelta]:
        """Flag the last delta of each client request that has just ended as a whole (all
        its samples, or its whole beam search): the one fact every consumer reads, instead
        of each counting samples."""
        ended: set[str] = set()
        for delta in reversed(deltas):
            client_id = delta.request_id
            if delta.finish_reason is None or client_id in ended or self._client_request_alive(client_id):
                continue
            ended.add(client_id)
            delta.request_finished = True
        return deltas

    def _client_request_alive(self, client_request_id: str) -> bool:
        """Whether any sequence of the client request is still waiting, running or swapped."""
        return client_request_id in self._beam_groups or any(
            i in self._requests for i in self._with_samples(client_request_id)
        )

    def _dequeue(self, req: Request) -> None:
        """Take an alive request out of whichever queue holds it."""
        if req.status == RequestStatus.RUNNING:
            self._running.remove(req)
        elif req.status == RequestStatus.SWAPPED:
            self._swapped.remove(req)
        else:
            self._waiting.remove(req)

    def _with_samples(self, request_id: str) -> list[str]:
        """The request and the samples forked off it, alive or not."""
        return [request_id, *self._sample_ids.get(request_id, ())]

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
        # Swap-in and admission never preempt, and after a preemption the pool is known to
        # be tight: taking requests in now would only set up the next preemption. (It also
        # keeps a swap block freed by a swap-in from being swapped out to in the same step:
        # the executor copies all swap-outs before all swap-ins.) Swapped requests go
        # before waiting ones: they held a place and keep theirs.
        if self._num_preemptions_total == num_preemptions_before:
            new_requests, new_counts = self._swap_in_swapped(token_budget)
            token_budget -= sum(new_counts)
            if not self._swapped:
                admitted, admitted_counts = self._admit_waiting(token_budget)
                new_requests += admitted
                new_counts += admitted_counts

        finished_ids, self._finished_ids = self._finished_ids, []
        swap_out, self._swap_out_pairs = self._swap_out_pairs, []
        swap_in, self._swap_in_pairs = self._swap_in_pairs, []
        block_copies, self._block_copies = self._block_copies, []
        beam_forks, self._beam_forks = self._beam_forks, []
        scheduled_ids = [r.request_id for r in new_requests] + [r.request_id for r in cached_requests]
        step = ExecuteStep(
            step_id=self._next_step_id,
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=new_counts + cached_counts,
            dropped_request_ids=finished_ids,
            swap_out=swap_out,
            swap_in=swap_in,
            block_copies=block_copies,
            forked_requests=self._forks(scheduled_ids, new_counts + cached_counts),
            beam_forks=beam_forks,
        )
        self._next_step_id += 1
        return step

    def update_from_output(self, step: ExecuteStep, result: StepResult) -> list[RequestDelta]:
        """Apply a step's result: advance each request by its scheduled tokens, append the
        sampled ones, finish those that hit a stop condition (freeing their blocks now).
        Requests aborted while the step ran are skipped. Blocks the step filled join the
        prefix cache (before a finished request frees them). Samples forked in the step
        become requests. Returns one delta per request or sample that got a token."""
        if result.step_id != step.step_id:
            raise ValueError(f"result of step {result.step_id} applied to step {step.step_id}")
        sampled = {token.sequence_id: token for token in result.sampled}
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
            samples = num_scheduled > 0 and req.num_computed_tokens + num_scheduled == req.num_tokens
            if samples and token is None:
                raise ValueError(f"step {step.step_id}: request {request_id} sampled nothing")
            if token is not None and not samples:
                raise ValueError(
                    f"step {step.step_id}: request {request_id} sampled a token in the "
                    "middle of its prompt"
                )
            updates.append((req, num_scheduled, token))
        forks_of: dict[str, list[tuple[ForkedRequest, SampledToken]]] = {}
        for fork in step.forked_requests:
            token = sampled.pop(fork.request_id, None)
            parent = self._requests.get(fork.parent_request_id)
            if parent is None or parent.status != RequestStatus.RUNNING:
                # The parent was aborted (or preempted) after the step was scheduled; the
                # executor forked it all the same and must forget the sample.
                self._finished_ids.append(fork.request_id)
                continue
            if token is None:
                raise ValueError(f"step {step.step_id}: forked sample {fork.request_id} sampled nothing")
            forks_of.setdefault(fork.parent_request_id, []).append((fork, token))
        if sampled:
            raise ValueError(
                f"step {step.step_id}: tokens sampled for requests not in the step: "
                f"{sorted(sampled)}"
            )

        deltas: list[RequestDelta] = []
        any_finished = False
        beam_rounds: list[BeamGroup] = []  # groups with a new report, in first-report order
        for req, num_scheduled, token in updates:
            req.num_computed_tokens += num_scheduled
            if token is not None and req.beam is None:
                req.output_token_ids.append(token.token_id)
            if self.config.enable_prefix_caching:
                self._cache_full_blocks(req)
            if token is None:
                continue
            if req.beam is not None:
                req.beam.reports[req.request_id] = token
                if req.beam not in beam_rounds:
                    beam_rounds.append(req.beam)
                continue
            # Forked before the parent may finish: the samples take their references to
            # its blocks while it still holds them.
            samples = [(req, token)] + [
                (self._fork(req, fork, fork_token), fork_token)
                for fork, fork_token in forks_of.get(req.request_id, ())
            ]
            for sample, sample_token in samples:
                status = stop_status(sample, sample_token.token_id, self.config.max_model_len)
                if status is not None:
                    self._finish(sample, status)
                    any_finished = True
                deltas.append(
                    RequestDelta(
                        sample.client_request_id,
                        [sample_token.token_id],
                        _token_logprobs(sample_token),
                        finish_reason=sample.finish_reason,
                        num_cached_tokens=sample.num_cached_tokens,
                        sample_index=sample.sample_index,
                    )
                )
        for group in beam_rounds:
            if len(group.reports) == len(group.beams):
                deltas += self._advance_beams(group)
                any_finished = True
        if any_finished:
            self._running = [r for r in self._running if not r.is_finished]
        return self._mark_request_ends(deltas)

    def _advance_beams(self, group: BeamGroup) -> list[RequestDelta]:
        """End a beam-search round: pick the next beams (fork, continue in place, free)
        or, when the search is over, free every beam and report the best n hypotheses.
        Finished beams are left in `self._running` for the caller to sweep."""
        if group.search.num_generated == 0:
            group.num_cached_tokens = group.beams[0].num_cached_tokens
        reports = [group.reports[beam.request_id] for beam in group.beams]
        live = [
            LiveBeam(score, beam.output_token_ids, report.top_token_ids, report.top_logprobs)
            for beam, score, report in zip(group.beams, group.scores, reports)
        ]
        group.reports.clear()
        selection = select_beams(group.search, live)
        if selection.done:
            for beam in group.beams:
                self._finish(beam, RequestStatus.FINISHED_STOPPED)
            del self._beam_groups[group.client_request_id]
            return [
                RequestDelta(
                    group.client_request_id,
                    hypothesis.output_token_ids,
                    finish_reason=hypothesis.finish_reason,
                    num_cached_tokens=group.num_cached_tokens,
                    sample_index=index,
                )
                for index, hypothesis in enumerate(group.search.finished[: group.n])
            ]
        # Forks first: they copy their parent's tokens and blocks before it takes its own
        # token, and before an unpicked beam gives its blocks back.
        continuing: set[int] = set()
        next_beams: list[Request] = []
        for candidate in selection.next_beams:
            parent = group.beams[candidate.parent]
            if candidate.parent in continuing:
                next_beams.append(self._fork_beam(parent, group))
            else:
                continuing.add(candidate.parent)
                next_beams.append(parent)
        for beam, candidate in zip(next_beams, selection.next_beams):
            beam.output_token_ids.append(candidate.token_id)
            beam.unsent_token_ids.append(candidate.token_id)
        for index, beam in enumerate(group.beams):
            if index not in continuing:
                self._finish(beam, RequestStatus.FINISHED_STOPPED)
        group.beams = next_beams
        group.scores = [candidate.score for candidate in selection.next_beams]
        return []

    def _fork_beam(self, parent: Request, group: BeamGroup) -> Request:
        """A new beam, a copy of `parent` sharing all its blocks (one more reference each;
        copy-on-write before the first write into the shared last block)."""
        group.num_forked += 1
        beam = self._branch(parent, f"{group.client_request_id}#b{group.num_forked}", parent.sampling_params)
        beam.beam = group
        beam.output_token_ids = list(parent.output_token_ids)
        beam.block_hashes = list(parent.block_hashes)  # full blocks of tokens both hold
        # Next to the rest of its group: a gang is scheduled and preempted as one run.
        last = max(i for i, r in enumerate(self._running) if r.beam is group)
        self._running.insert(last + 1, beam)
        self._beam_forks.append(BeamFork(beam.request_id, parent.request_id))
        return beam

    # --- executor loss (called by services/scheduler/service.py) ---------------------

    def requeue_all_running(self) -> list[str]:
        """The executor's KV cache is gone (it died, or a new one took its place): send
        every running request back to the waiting queue exactly as a preemption by
        recompute does (blocks freed, generated tokens kept, ahead of never-preempted
        requests, in arrival order), and forget every cached prefix, whose K/V went with
        the cache. Requests in the step in flight are running, so they are included; the
        step's result, should it ever come, must be dropped by the caller. Returns the
        ids requeued, in admission order."""
        requeued = list(self._running)
        for req in requeued:
            self._preempt(req)
        # The new executor mirrors nothing: forked beams come back as NewRequestData too.
        self._beam_forks = []
        # The swap pool went with the executor too: swapped requests recompute as well
        # (they are not mirrored by the executor, so not in the step's finished ids).
        for req in self._swapped:
            self._release_swap_blocks(req)
            req.num_computed_tokens = 0
            req.num_cached_blocks = 0
            req.status = RequestStatus.WAITING
            bisect.insort(self._waiting, req, key=waiting_order_key)
        requeued += self._swapped
        self._swapped = []
        # Only running requests hold blocks, so now none is referenced: taking every free
        # block evicts each cached one (recording the eviction), giving them back empties them.
        pool = self._block_pool
        pool.free(pool.allocate(pool.num_free_blocks))
        return [req.request_id for req in requeued]

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
    def num_swapped(self) -> int:
        return len(self._swapped)

    @property
    def swapped(self) -> tuple[Request, ...]:
        """In swap-in order."""
        return tuple(self._swapped)

    @property
    def swap_pool(self) -> BlockPool | None:
        """The executor's swap blocks; None when it has none."""
        return self._swap_pool

    @property
    def num_preemptions_total(self) -> int:
        """By recompute and by swap."""
        return self._num_preemptions_total

    @property
    def num_swap_outs_total(self) -> int:
        return self._num_swap_outs_total

    @property
    def num_swap_ins_total(self) -> int:
        return self._num_swap_ins_total

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self._prefix_cache_stats

    def take_prefix_cache_events(self) -> list[PrefixCacheEvent]:
        """Blocks cached, reused or evicted since the last call, oldest first; empty unless
        made with `record_prefix_cache_events=True`."""
        return self._block_pool.take_events()

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting or self._swapped)

    def get_request(self, request_id: str) -> Request | None:
        """A waiting, running or swapped request; None once it has finished."""
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
        budget, preempting when the pool runs dry. The beams of a beam search sit next to
        each other in `self._running` and get their blocks as one: preempting some beams
        of a group while others hold blocks and wait for them could stall it for good."""
        cached_requests: list[CachedRequestData] = []
        counts: list[int] = []
        index = 0  # self._running[:index] are scheduled (or passed over) in this step
        while index < len(self._running) and token_budget > 0:
            gang = self._running[index : index + self._gang_size(index)]
            plan: list[tuple[Request, int, int]] = []  # (request, tokens, new blocks)
            budget_left = token_budget
            for member in gang:
                num_new = num_tokens_to_schedule(member, budget_left)
                budget_left -= num_new
                plan.append((member, num_new, self._num_new_blocks(member, num_new)))
            num_copies = sum(
                1 for member, num_new, _ in plan if num_new and self._shared_write_block(member) is not None
            )
            if not self._make_room(index, len(gang), sum(blocks for _, _, blocks in plan) + num_copies):
                continue  # the gang was preempted; self._running[index] is the next one
            for member, num_new, num_new_blocks in plan:
                if num_new == 0:  # a beam that reported, waiting for the rest of its group
                    continue
                num_blocks_before = len(member.block_ids)
                # After _make_room: a preempted sharer may have left the block to it alone.
                num_replaced = self._copy_on_write(member)
                member.block_ids.extend(self._block_pool.allocate(num_new_blocks))
                cached_requests.append(
                    CachedRequestData(
                        member.request_id,
                        member.block_ids[num_blocks_before - num_replaced :],
                        member.num_computed_tokens,
                        num_replaced_blocks=num_replaced,
                        new_token_ids=member.unsent_token_ids,
                    )
                )
                member.unsent_token_ids = []
                counts.append(num_new)
                token_budget -= num_new
            index += len(gang)
        return cached_requests, counts

    def _gang_size(self, index: int) -> int:
        """How many requests from `self._running[index]` on must be scheduled (and
        preempted) together: the run of beams of its beam search, else 1."""
        group = self._running[index].beam
        if group is None:
            return 1
        size = 1
        while index + size < len(self._running) and self._running[index + size].beam is group:
            size += 1
        return size

    def _admit_waiting(self, token_budget: int) -> tuple[list[NewRequestData], list[int]]:
        """Admit from the head of the waiting queue while budget, sequence slots and free
        blocks allow. A request starts after the longest cached prefix of its tokens; one
        resumed after preemption recomputes the rest of prompt + output. The beams of a
        preempted beam search come back together, with blocks for all their tokens, or
        not at all (see `_schedule_running`)."""
        pool = self._block_pool
        new_requests: list[NewRequestData] = []
        counts: list[int] = []
        num_samples_to_fork = sum(self._num_sequences_to_add(r) for r in self._running)
        while (
            self._waiting
            and token_budget > 0
            and len(self._running) < self.config.max_num_running
        ):
            head = self._waiting[0]
            gang = [head] if head.beam is None else [r for r in self._waiting if r.beam is head.beam]
            num_to_add = sum(self._num_sequences_to_add(r) for r in gang)
            num_seqs_after = len(self._running) + num_samples_to_fork + len(gang) + num_to_add
            if num_seqs_after > self.config.max_num_running:
                break  # samples still to fork (its own and others') need sequence slots too
            hits = [self._find_cached_prefix(r) for r in gang]
            # A hit on a cached block nobody holds takes it out of the free blocks too.
            revived = {block_id for hit in hits for block_id in hit if pool.ref_count(block_id) == 0}
            # One request needs blocks for what this step computes of it; a gang, for all
            # its tokens (its members then never wait on each other for blocks).
            budget = token_budget if len(gang) == 1 else None
            num_blocks = sum(self._admission_need(r, hit, budget)[1] for r, hit in zip(gang, hits))
            if num_blocks + len(revived) > pool.num_free_blocks:
                break  # FCFS: nobody overtakes the head of the queue
            num_samples_to_fork += num_to_add
            for hit_block_ids in hits:
                pool.incref(hit_block_ids)  # all before allocating, which could evict them
            for req, hit_block_ids in zip(gang, hits):
                self._waiting.remove(req)
                new_request, num_new = self._admit(req, hit_block_ids, token_budget)
                new_requests.append(new_request)
                counts.append(num_new)
                token_budget -= num_new
        return new_requests, counts

    def _admit(self, req: Request, hit_block_ids: list[int], token_budget: int) -> tuple[NewRequestData, int]:
        """Make a waiting request running: its cached prefix, blocks for the tokens this
        step computes (as many as the budget allows, maybe none), the executor's copy.
        The caller has taken its references to the hit blocks."""
        pool = self._block_pool
        num_new, num_new_blocks = self._admission_need(req, hit_block_ids, token_budget)
        req.block_ids = hit_block_ids + pool.allocate(num_new_blocks)
        num_hit_tokens = len(hit_block_ids) * pool.block_size
        req.num_computed_tokens = num_hit_tokens
        req.num_cached_blocks = len(hit_block_ids)
        if self.config.enable_prefix_caching:
            self._prefix_cache_stats.record(req.num_tokens, num_hit_tokens)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit_tokens
        req.status = RequestStatus.RUNNING
        self._running.append(req)
        return new_request_data(req), num_new

    def _admission_need(self, req: Request, hit_block_ids: list[int], token_budget: int | None) -> tuple[int, int]:
        """(tokens to compute, blocks to allocate) for admitting `req` after its cached
        prefix, with `token_budget` tokens left in the step (None: all its tokens)."""
        num_hit_tokens = len(hit_block_ids) * self._block_pool.block_size
        num_new = req.num_tokens - num_hit_tokens
        if token_budget is not None:
            num_new = min(num_new, token_budget)
        num_new_blocks = blocks_to_cover(num_hit_tokens + num_new, self._block_pool.block_size) - len(hit_block_ids)
        return num_new, num_new_blocks

    def _find_cached_prefix(self, req: Request) -> list[int]:
        """The blocks holding the longest cached prefix of the request's tokens, in order.
        Whole blocks only, and never all tokens: the step that samples the next token must
        run the model on the last one."""
        if not self.config.enable_prefix_caching:
            return []
        self._update_block_hashes(req)
        max_hit_blocks = (req.num_tokens - 1) // self._block_pool.block_size
        hit_block_ids: list[int] = []
        for block_hash in req.block_hashes[:max_hit_blocks]:
            block_id = self._block_pool.cached_block(block_hash)
            if block_id is None:
                break
            hit_block_ids.append(block_id)
        return hit_block_ids

    def _cache_full_blocks(self, req: Request) -> None:
        """Offer the blocks the last step made full (and computed) to the prefix cache."""
        num_full_blocks = req.num_computed_tokens // self._block_pool.block_size
        if num_full_blocks <= req.num_cached_blocks:
            return
        self._update_block_hashes(req)
        for index in range(req.num_cached_blocks, num_full_blocks):
            # False for a block another request computed first: this copy stays private.
            self._block_pool.cache_block(req.block_ids[index], req.block_hashes[index])
        req.num_cached_blocks = num_full_blocks

    def _update_block_hashes(self, req: Request) -> None:
        """Hash the full blocks of tokens the request has gained (at most one per call
        after the prompt's), building the token list only when there is one."""
        if req.num_tokens // self._block_pool.block_size > len(req.block_hashes):
            extend_block_hashes(
                req.block_hashes, req.all_token_ids, self._block_pool.block_size, self._hash_extra_keys
            )

    def _num_new_blocks(self, req: Request, num_new_tokens: int) -> int:
        """Blocks to append so the table covers the tokens computed after this step; 0
        until the last block is full (waste stays under one block per request)."""
        num_covered = req.num_computed_tokens + num_new_tokens
        return blocks_to_cover(num_covered, self._block_pool.block_size) - len(req.block_ids)

    def _fork(self, parent: Request, fork: ForkedRequest, token: SampledToken) -> Request:
        """Make sample `fork.sample_index` of `parent`, which has just computed its prompt
        and sampled its first token: the sample shares every block of the parent (one more
        reference each; copy-on-write before its first write into the shared last block)
        and holds its own first token, drawn from the same logits with its own seed."""
        sample = self._branch(parent, fork.request_id, parent.sampling_params.for_sample(fork.sample_index))
        sample.sample_index = fork.sample_index
        sample.output_token_ids.append(token.token_id)
        # The hashes of the prompt's full blocks are the sample's too; those of a block
        # holding the parent's first token are not.
        sample.block_hashes = parent.block_hashes[: parent.num_prompt_tokens // self._block_pool.block_size]
        self._running.append(sample)
        self._sample_ids.setdefault(parent.request_id, []).append(sample.request_id)
        return sample

    def _branch(self, parent: Request, request_id: str, params: SamplingParams) -> Request:
        """A running request that shares every block of `parent` (one more reference
        each) and its computed prompt: the common part of forking a parallel sample and
        a beam. The caller gives it its tokens and hashes and queues it."""
        child = Request(
            request_id,
            parent.prompt_token_ids,
            params,
            arrival_time=parent.arrival_time,
            eos_token_id=parent.eos_token_id,
            priority=parent.priority,
        )
        child.parent_request_id = parent.client_request_id
        child.arrival_seq = self._next_arrival_seq  # a tie with its parent: preempted first
        self._next_arrival_seq += 1
        child.num_computed_tokens = parent.num_computed_tokens
        self._block_pool.incref(parent.block_ids)
        child.block_ids = list(parent.block_ids)
        child.num_cached_blocks = parent.num_cached_blocks
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.RUNNING
        self._requests[request_id] = child
        return child

    @staticmethod
    def _num_samples_to_fork(req: Request) -> int:
        """The samples `req` has yet to fork (n - 1 until its first token, then none)."""
        if req.beam is None and req.parent_request_id is None and req.num_output_tokens == 0:
            return req.sampling_params.n - 1
        return 0

    @classmethod
    def _num_sequences_to_add(cls, req: Request) -> int:
        """Sequence slots `req` will take beyond its own: samples it has yet to fork, or
        the other beams of a beam search that has not run its first round."""
        if req.beam is not None:
            return req.beam.search.beam_width - 1 if req.beam.search.num_generated == 0 else 0
        return cls._num_samples_to_fork(req)

    def _forks(self, scheduled_ids: list[str], counts: list[int]) -> list[ForkedRequest]:
        """The samples to fork off the requests with `n > 1` that sample their first token
        in this step: samples 1 .. n-1, as ids f"{id}#{i}". They become requests when the
        step's result comes back (`_fork`), sharing the parent's blocks."""
        forks: list[ForkedRequest] = []
        for request_id, num_new in zip(scheduled_ids, counts):
            req = self._requests[request_id]
            if self._num_samples_to_fork(req) and req.num_computed_tokens + num_new == req.num_tokens:
                forks += [ForkedRequest(f"{request_id}#{i}", request_id, i) for i in range(1, req.sampling_params.n)]
        return forks

    def _shared_write_block(self, req: Request) -> int | None:
        """The index in `req.block_ids` of the block its next token is written into, when
        another request holds it too: a partly filled last block shared by forked samples.
        (Full shared blocks, forked or prefix-cached, lie before `num_computed_tokens` and
        are only read.)"""
        index = req.num_computed_tokens // self._block_pool.block_size
        if index < len(req.block_ids) and self._block_pool.ref_count(req.block_ids[index]) > 1:
            return index
        return None

    def _copy_on_write(self, req: Request) -> int:
        """Give `req` a private copy of the shared block it is about to write into (the
        executor copies the K/V before the step's forward) and drop its reference to the
        original, which the other holders keep; the last holder writes in place, so n
        samples sharing a block make n - 1 copies. Returns the number of blocks replaced at
        the end of the table (0 or 1)."""
        index = self._shared_write_block(req)
        if index is None:
            return 0
        # Only the last block can be partly filled, so the replaced block is the last one.
        assert index == len(req.block_ids) - 1, f"{req!r}: shared block {index} is not the last"
        source = req.block_ids[index]
        (destination,) = self._block_pool.allocate(1)
        self._block_pool.free([source])
        req.block_ids[index] = destination
        self._block_copies.append((source, destination))
        return 1

    def _make_room(self, index: int, gang_size: int, num_blocks: int) -> bool:
        """Preempt running requests not yet scheduled in this step (`self._running[index:]`)
        until `num_blocks` are free for the gang `self._running[index : index + gang_size]`.
        A victim that is a beam takes its whole group with it. False if the gang was
        itself the victim."""
        gang = self._running[index : index + gang_size]
        while self._block_pool.num_free_blocks < num_blocks:
            victim = pick_preemption_victim(self._running[index:])
            if victim.beam is not None:
                for beam in [r for r in self._running[index:] if r.beam is victim.beam]:
                    self._preempt(beam)
            elif not self._swap_out(victim):
                self._preempt(victim)
            if victim in gang:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        """Preempt by recompute: drop its K/V, keep its output, requeue it. It resumes as
        a NewRequestData with prompt + output and recomputes what the prefix cache no
        longer holds (its own full blocks stay cached until evicted)."""
        self._running.remove(req)
        self._block_pool.free(reversed(req.block_ids))  # tail first: see block_pool.py
        if req.beam is not None:
            req.beam.reports.pop(req.request_id, None)  # it reports again after recomputing
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_cached_blocks = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self._num_preemptions_total += 1
        bisect.insort(self._waiting, req, key=waiting_order_key)
        self._finished_ids.append(req.request_id)  # the executor drops its mirror

    def _swap_out(self, req: Request) -> bool:
        """Preempt by swap, if that is the mode and the swap pool has room: its blocks are
        copied to swap blocks at the start of the step, then freed here (another request
        may get them in this same step: the executor copies out before anything else).
        Full blocks keep their hashes, so they stay in the prefix cache until evicted.
        False (nothing done) when the caller must preempt by recompute instead."""
        swap_pool = self._swap_pool
        if self.config.preemption_mode != "swap" or swap_pool is None or req.beam is not None:
            return False
        if len(req.block_ids) > swap_pool.num_free_blocks:
            return False
        self._running.remove(req)
        req.swap_block_ids = swap_pool.allocate(len(req.block_ids))
        self._swap_out_pairs.extend(zip(req.block_ids, req.swap_block_ids))
        self._block_pool.free(reversed(req.block_ids))  # tail first: see block_pool.py
        req.block_ids = []
        req.status = RequestStatus.SWAPPED
        req.num_preemptions += 1
        self._num_preemptions_total += 1
        self._num_swap_outs_total += 1
        bisect.insort(self._swapped, req, key=waiting_order_key)
        # The executor drops its mirror; the request comes back as a NewRequestData whose
        # K/V up to num_computed_tokens is already in place, like a prefix-cache hit.
        self._finished_ids.append(req.request_id)
        return True

    def _swap_in_swapped(self, token_budget: int) -> tuple[list[NewRequestData], list[int]]:
        """Swap in from the head of the swapped queue while budget, sequence slots and
        free blocks allow: fresh device blocks, copied into from the swap blocks at the
        start of the step, then scheduled like a running request."""
        pool = self._block_pool
        new_requests: list[NewRequestData] = []
        counts: list[int] = []
        while self._swapped and token_budget > 0 and len(self._running) < self.config.max_num_running:
            req = self._swapped[0]
            num_new = num_tokens_to_schedule(req, token_budget)
            num_blocks = blocks_to_cover(req.num_computed_tokens + num_new, pool.block_size)
            if num_blocks > pool.num_free_blocks:
                break  # in order: nobody overtakes the head of the queue
            self._swapped.pop(0)
            req.block_ids = pool.allocate(num_blocks)
            self._swap_in_pairs.extend(zip(req.swap_block_ids, req.block_ids))
            self._release_swap_blocks(req)
            self._num_swap_ins_total += 1
            req.status = RequestStatus.RUNNING
            self._running.append(req)
            # Fresh blocks: offer its full ones to the prefix cache again (a hash still
            # cached in the block it was swapped out of keeps that block: first one wins).
            # Their K/V arrive before anything in the step reads them.
            req.num_cached_blocks = 0
            if self.config.enable_prefix_caching:
                self._cache_full_blocks(req)
            new_requests.append(new_request_data(req))
            counts.append(num_new)
            token_budget -= num_new
        return new_requests, counts

    def _release_swap_blocks(self, req: Request) -> None:
        if req.swap_block_ids:
            assert self._swap_pool is not None
            self._swap_pool.free(req.swap_block_ids)
            req.swap_block_ids = []

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Free everything a request holds. The caller takes it out of its queue."""
        if req.status == RequestStatus.RUNNING:
            self._finished_ids.append(req.request_id)  # waiting and swapped ones are not mirrored
        self._block_pool.free(reversed(req.block_ids))  # tail first: see block_pool.py
        self._release_swap_blocks(req)
        req.block_ids = []
        req.num_cached_blocks = 0
        req.status = status
        del self._requests[req.request_id]
        parent_id = req.client_request_id
        if parent_id in self._sample_ids and not any(
            i in self._requests for i in self._with_samples(parent_id)
        ):
            del self._sample_ids[parent_id]  # the last sample of the request is gone
