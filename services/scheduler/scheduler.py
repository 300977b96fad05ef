"""Continuous batching over a paged KV cache: which requests run next, with how many
tokens each, in which blocks.

Pure policy: no sockets, no tensors. The service loop calls:

    step = scheduler.schedule()                       # -> executor
    deltas = scheduler.update_from_output(step, result)  # <- executor, -> clients

with `add_request` / `abort_requests` in between as messages arrive; and, with
asynchronous scheduling, a second `schedule()` while a step is in flight whenever
`can_schedule_ahead()` says it comes out as it would after that step's result
(`steps_in_flight.py`: a step counts as run the moment it is scheduled).

Scheduling is unified as in vLLM v1: a request has `num_tokens` (prompt + output) and
`num_computed_tokens` (K/V in the cache); a step computes up to the difference, capped by
what is left of the step's token budget. A long prompt is thereby split into chunks
(chunked prefill), a decode is a 1-token step, and a request resumed after preemption
simply recomputes prompt + output. A request samples a token in a step exactly when the
step brings `num_computed_tokens` up to `num_tokens`; the executor applies the same rule (`shared/step_rules.py`).

This class keeps the queues and the decisions: add, abort, schedule, update, preempt. It
asks the others for the rest:
- `kv_cache_manager.py`: every block and the prefix cache (this class never touches the
  block pool);
- `swap_space.py`: the executor's CPU swap pool, for preemption by swap;
- `forking.py`: forks sharing their parent's blocks (parallel samples, beam forks);
- `beam_group.py`: beam searches, run as gangs;
- `policy.py`: the pure rules (orderings, validation, stop conditions);
- `step_result.py`: a result checked against its step before anything changes.

At about 640 lines this module is over the project's ~500 mark on purpose: what is left is
the queues and the four operations on them, which share every queue; splitting further
would put the queues in one class and leave the operations delegating to it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from pagedserve.services.scheduler.beam_group import BeamGroup, gang_of, gang_size
from pagedserve.services.scheduler.block_pool import BlockPool
from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.forking import ParallelSamples, fork_request
from pagedserve.services.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.services.scheduler.policy import (
    QueueFullError,
    blocks_to_cover,
    ends_with_pending_tokens,
    num_tokens_to_schedule,
    pick_preemption_victim,
    stop_status,
    validate_request,
    waiting_order_key,
)
from pagedserve.services.scheduler.prefix_cache import PrefixCacheEvent
from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.services.scheduler.step_result import match_result
from pagedserve.services.scheduler.steps_in_flight import StepsInFlight, count_as_scheduled
from pagedserve.services.scheduler.swap_space import SwapSpace
from pagedserve.shared.messages import (
    BeamFork,
    CachedRequestData,
    ExecuteStep,
    ForkedRequest,
    NewRequestData,
    PrefixCacheStats,
    RequestDelta,
    SampledToken,
    StepResult,
)
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.sequence_ids import sample_sequence_id


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        *,
        num_swap_blocks: int = 0,
        record_prefix_cache_events: bool = False,
        kv_group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        """`num_swap_blocks`: the executor's CPU swap pool, for preemption by swap (0: none,
        so every preemption recomputes). `record_prefix_cache_events`: keep the prefix-cache
        events for `take_prefix_cache_events` (only when something drains them, e.g. a Redis
        mirror). `kv_group_windows`: the model's KV groups, each one's sliding window or
        None (`kv_groups.py`; one global group for a model without windows)."""
        self.config = config
        self._kv = KVCacheManager(
            num_blocks,
            block_size,
            enable_prefix_caching=config.limits.enable_prefix_caching,
            hash_extra_keys=(config.model,),
            record_events=record_prefix_cache_events,
            group_windows=kv_group_windows,
        )
        self._swap = SwapSpace(num_swap_blocks, block_size)
        self._requests: dict[str, Request] = {}  # alive: waiting, running or swapped
        self._waiting: list[Request] = []  # sorted by waiting_order_key
        self._running: list[Request] = []  # admission order = scheduling order
        self._swapped: list[Request] = []  # sorted by waiting_order_key
        self._samples = ParallelSamples()
        # Beam search: the groups by client request id, and the beams forked in the last
        # update, for the next step to announce.
        self._beam_groups: dict[str, BeamGroup] = {}
        self._beam_forks: list[BeamFork] = []
        # Requests the executor mirrors and must forget before the next step.
        self._dropped_ids: list[str] = []
        self._next_step_id = 0
        self._in_flight = StepsInFlight()  # scheduled, result not applied yet
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
        # Every group holds at most a whole table: a request that fits one group's share fits.
        validate_request(req, self.config, self._kv.num_blocks // self._kv.num_groups, self._kv.block_size)
        if len(self._waiting) >= self.config.limits.max_num_waiting:
            raise QueueFullError(len(self._waiting), self.config.limits.max_num_waiting)
        req.arrival_seq = self._take_arrival_seq()
        self._kv.hash_blocks(req)
        if req.sampling_params.use_beam_search:
            self._beam_groups[req.request_id] = BeamGroup.start(req, self.config.max_model_len)
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
            client_id = req.beam_group.client_request_id if req and req.beam_group else request_id
            group = self._beam_groups.pop(client_id, None)
            if group is None:
                continue
            for beam in group.beams:
                self._dequeue(beam)
                self._finish(beam, RequestStatus.FINISHED_ABORTED)
            deltas += group.abort_deltas()
        for request_id in [i for request_id in request_ids for i in self._samples.with_samples(request_id)]:
            req = self._requests.get(request_id)
            if req is None:
                continue
            self._dequeue(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            deltas.append(req.delta(None))
        return self._mark_request_ends(deltas)

    def abort_samples(self, request_id: str, sample_indices: Iterable[int]) -> list[RequestDelta]:
        """Abort some samples of a parallel-sampling request (n > 1), freeing their blocks
        at once while the others go on: the gateway matched a stop string in their text.
        Sample 0 is the request's own sequence, sample i its fork f"{request_id}#{i}".
        Beams are not samples (a search cannot lose one beam): ignored, as are unknown or
        finished ones."""
        deltas: list[RequestDelta] = []
        for sample_index in sample_indices:
            req = self._requests.get(sample_sequence_id(request_id, sample_index))
            if req is None or req.beam_group is not None or req.client_request_id != request_id:
                continue
            self._dequeue(req)
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            deltas.append(req.delta(None))
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
            i in self._requests for i in self._samples.with_samples(client_request_id)
        )

    def _dequeue(self, req: Request) -> None:
        """Take an alive request out of whichever queue holds it."""
        if req.status == RequestStatus.RUNNING:
            self._running.remove(req)
        elif req.status == RequestStatus.SWAPPED:
            self._swapped.remove(req)
        else:
            self._waiting.remove(req)

    # --- one step -------------------------------------------------------------------

    def schedule(self) -> ExecuteStep:
        """Decide the next step: running requests first (so decodes are never starved by
        a long prompt), then admissions from the waiting queue with what budget, sequence
        slots and blocks are left."""
        token_budget = self.config.limits.max_num_batched_tokens
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

        dropped_ids, self._dropped_ids = self._dropped_ids, []
        beam_forks, self._beam_forks = self._beam_forks, []
        scheduled_ids = [r.request_id for r in new_requests] + [r.request_id for r in cached_requests]
        counts = new_counts + cached_counts
        scheduled = [(self._requests[request_id], num_new) for request_id, num_new in zip(scheduled_ids, counts)]
        step = ExecuteStep(
            step_id=self._next_step_id,
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=counts,
            dropped_request_ids=dropped_ids,
            swap_out=self._swap.take_swap_out(),
            swap_in=self._swap.take_swap_in(),
            block_copies=self._kv.take_block_copies(),
            forked_requests=self._samples.forks_for_step(scheduled),
            beam_forks=beam_forks,
        )
        # Counted as run already: the next step may be scheduled on top of it.
        self._in_flight.add(step, count_as_scheduled(scheduled))
        self._next_step_id += 1
        return step

    def can_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled now, while the one step in flight runs
        (asynchronous scheduling): it must come out exactly as it would once that step's
        result is in. So not when that step forks samples (the forks become requests only
        with its result), nor during a beam search (the scheduler picks a beam's tokens
        from the result), nor when the next step would have to preempt (a request in
        flight would lose a token its result is about to bring), nor when there is nothing
        to schedule but requests whose pending tokens end them."""
        if not self._in_flight.one_without_forks() or self._beam_groups:
            return False
        token_budget = self.config.limits.max_num_batched_tokens
        num_blocks = 0
        for req in self._running:
            if token_budget <= 0:
                break
            if ends_with_pending_tokens(req, self.config.max_model_len):
                continue
            num_new = num_tokens_to_schedule(req, token_budget)
            num_blocks += self._kv.num_blocks_to_schedule(req, num_new)
            token_budget -= num_new
        something_to_run = token_budget < self.config.limits.max_num_batched_tokens or self._waiting or self._swapped
        return bool(something_to_run) and num_blocks <= self._kv.num_free_blocks

    def update_from_output(self, step: ExecuteStep, result: StepResult) -> list[RequestDelta]:
        """Apply a step's result (its tokens were counted as computed when it was
        scheduled): append the sampled tokens, pending until now, finish the requests that
        hit a stop condition (freeing their blocks now).
        Requests aborted while the step ran are skipped; a result that disagrees with the
        step changes nothing (ValueError, see step_result.py). Blocks the step filled join
        the prefix cache (before a finished request frees them). Samples forked in the
        step become requests. Returns one delta per request or sample that got a token."""
        matched = match_result(step, result, self._requests, self._in_flight.samples(step.step_id))
        self._in_flight.finish(step.step_id)
        self._dropped_ids += matched.orphan_fork_ids
        deltas: list[RequestDelta] = []
        any_finished = False
        beam_rounds: list[BeamGroup] = []  # groups with a new report, in first-report order
        for req, num_computed, token in matched.updates:
            if token is not None:
                req.num_pending_tokens -= 1
                if req.beam_group is None:
                    req.output_token_ids.append(token.token_id)
            self._kv.register_full_blocks(req, num_computed)
            if token is None:
                continue
            if req.beam_group is not None:
                req.beam_group.reports[req.request_id] = token
                if req.beam_group not in beam_rounds:
                    beam_rounds.append(req.beam_group)
                continue
            # Forked before the parent may finish: the samples take their references to
            # its blocks while it still holds them.
            samples = [(req, token)] + [
                (self._fork_sample(req, fork, fork_token), fork_token)
                for fork, fork_token in matched.forks_of.get(req.request_id, ())
            ]
            for sample, sample_token in samples:
                status = stop_status(sample, sample_token.token_id, self.config.max_model_len)
                if status is not None:
                    self._finish(sample, status)
                    any_finished = True
                deltas.append(sample.delta(sample_token))
        for group in beam_rounds:
            if group.all_reported:
                deltas += self._run_beam_round(group)
                any_finished = True
        if any_finished:
            self._running = [r for r in self._running if not r.is_finished]
        return self._mark_request_ends(deltas)

    # --- forks: parallel samples and beams, one mechanism ---------------------------

    def _fork(self, parent: Request, request_id: str, params: SamplingParams, num_shared_output_tokens: int) -> Request:
        """A new running sequence sharing `parent`'s blocks (`forking.fork_request`),
        known to the scheduler; the caller queues it."""
        child = fork_request(parent, request_id, params, num_shared_output_tokens, self._take_arrival_seq(), self._kv)
        self._requests[request_id] = child
        return child

    def _fork_sample(self, parent: Request, fork: ForkedRequest, token: SampledToken) -> Request:
        """Sample `fork.sample_index` of `parent`, which has just computed its prompt and
        sampled its first token: the sample holds its own first token, drawn from the same
        logits with its own seed."""
        sample = self._fork(parent, fork.request_id, parent.sampling_params.for_sample(fork.sample_index), 0)
        sample.sample_index = fork.sample_index
        sample.output_token_ids.append(token.token_id)
        self._running.append(sample)
        self._samples.add(sample)
        return sample

    def _fork_beam(self, parent: Request) -> Request:
        """A new beam, a copy of `parent` with all its tokens, next to the rest of its
        group in the running queue (a gang is scheduled and preempted as one run)."""
        group = parent.beam_group
        assert group is not None
        beam = self._fork(parent, group.next_fork_id(), parent.sampling_params, parent.num_output_tokens)
        beam.beam_group = group
        last = max(i for i, r in enumerate(self._running) if r.beam_group is group)
        self._running.insert(last + 1, beam)
        self._beam_forks.append(BeamFork(beam.request_id, parent.request_id))
        return beam

    def _run_beam_round(self, group: BeamGroup) -> list[RequestDelta]:
        """Every live beam of `group` has reported: fork, continue or free beams, or, when
        the search is over, free them all and report the best n hypotheses. Finished
        beams are left in `self._running` for the caller to sweep."""
        done, dropped = group.run_round(self._fork_beam)
        for beam in dropped:
            self._finish(beam, RequestStatus.FINISHED_STOPPED)
        if not done:
            return []
        del self._beam_groups[group.client_request_id]
        return group.hypothesis_deltas()

    @staticmethod
    def _num_sequences_to_add(req: Request) -> int:
        """Sequence slots `req` will take beyond its own: samples it has yet to fork, or
        the other beams of a beam search that has not run its first round."""
        if req.beam_group is not None:
            return req.beam_group.num_beams_to_add
        return ParallelSamples.num_to_fork(req)

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
        self._in_flight.clear()  # their results, should they come, are dropped by the caller
        # The swap pool went with the executor too: swapped requests recompute as well
        # (they are not mirrored by the executor, so not in the step's dropped ids).
        for req in self._swapped:
            self._swap.release(req)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            bisect.insort(self._waiting, req, key=waiting_order_key)
        requeued += self._swapped
        self._swapped = []
        self._kv.forget_cached_prefixes()
        return [req.request_id for req in requeued]

    # --- introspection (admin status page, tests) ------------------------------------

    @property
    def block_pool(self) -> BlockPool:
        return self._kv.block_pool

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
        return self._swap.pool

    @property
    def num_preemptions_total(self) -> int:
        """By recompute and by swap."""
        return self._num_preemptions_total

    @property
    def num_swap_outs_total(self) -> int:
        return self._swap.num_swap_outs_total

    @property
    def num_swap_ins_total(self) -> int:
        return self._swap.num_swap_ins_total

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Live counters (the same struct the admin snapshot sends)."""
        return self._kv.prefix_cache_stats

    def take_prefix_cache_events(self) -> list[PrefixCacheEvent]:
        """Blocks cached, reused or evicted since the last call, oldest first; empty unless
        made with `record_prefix_cache_events=True`."""
        return self._kv.take_events()

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting or self._swapped)

    def get_request(self, request_id: str) -> Request | None:
        """A waiting, running or swapped request; None once it has finished."""
        return self._requests.get(request_id)

    def kv_utilisation(self) -> float:
        """Tokens whose K/V are stored / slots allocated, over running requests: what
        on-demand allocation wins over reserving max_model_len per sequence. 0.0 when
        nothing is allocated (nothing is used well). The one answer: the admin snapshot
        reports this too. Over the first KV group's table: blocks a sliding window dropped
        are neither stored nor allocated."""
        block_size = self._kv.block_size
        dropped = [r.num_dropped_blocks[0] * block_size if r.num_dropped_blocks else 0 for r in self._running]
        num_slots = sum(len(r.block_ids) for r in self._running) * block_size - sum(dropped)
        if num_slots == 0:
            return 0.0
        return (sum(r.num_computed_tokens for r in self._running) - sum(dropped)) / num_slots

    # --- private --------------------------------------------------------------------

    def _take_arrival_seq(self) -> int:
        """Breaks arrival_time ties, so that every order is total and deterministic."""
        self._next_arrival_seq += 1
        return self._next_arrival_seq - 1

    def _schedule_running(self, token_budget: int) -> tuple[list[CachedRequestData], list[int]]:
        """Give each running request, in admission order, what it still needs within the
        budget, preempting when the pool runs dry. The beams of a beam search sit next to
        each other in `self._running` and get their blocks as one (see beam_group.py)."""
        cached_requests: list[CachedRequestData] = []
        counts: list[int] = []
        index = 0  # self._running[:index] are scheduled (or passed over) in this step
        while index < len(self._running) and token_budget > 0:
            gang = self._running[index : index + gang_size(self._running, index)]
            plan: list[tuple[Request, int]] = []  # (request, tokens)
            budget_left = token_budget
            for member in gang:
                if ends_with_pending_tokens(member, self.config.max_model_len):
                    num_new = 0  # its result in flight ends it: it is done computing
                else:
                    num_new = num_tokens_to_schedule(member, budget_left)
                budget_left -= num_new
                plan.append((member, num_new))
            num_blocks = sum(self._kv.num_blocks_to_schedule(member, num_new) for member, num_new in plan)
            if not self._make_room(index, len(gang), num_blocks):
                continue  # the gang was preempted; self._running[index] is the next one
            for member, num_new in plan:
                if num_new == 0:  # a beam that reported, waiting for its group; or one ending
                    continue
                # After _make_room: a preempted sharer may have left a block to it alone.
                new_block_ids, num_replaced, group_deltas = self._kv.allocate_slots(member, num_new)
                cached_requests.append(member.cached_request_data(new_block_ids, num_replaced, group_deltas))
                counts.append(num_new)
                token_budget -= num_new
            index += len(gang)
        return cached_requests, counts

    def _admit_waiting(self, token_budget: int) -> tuple[list[NewRequestData], list[int]]:
        """Admit from the head of the waiting queue while budget, sequence slots and free
        blocks allow. A request starts after the longest cached prefix of its tokens; one
        resumed after preemption recomputes the rest of prompt + output. The beams of a
        preempted beam search come back together, with blocks for all their tokens, or
        not at all (see beam_group.py)."""
        new_requests: list[NewRequestData] = []
        counts: list[int] = []
        num_to_fork = sum(self._num_sequences_to_add(r) for r in self._running)
        while self._waiting and token_budget > 0 and len(self._running) < self.config.max_num_running:
            gang = gang_of(self._waiting, self._waiting[0])
            num_to_add = sum(self._num_sequences_to_add(r) for r in gang)
            if len(self._running) + num_to_fork + len(gang) + num_to_add > self.config.max_num_running:
                break  # samples still to fork (its own and others') need sequence slots too
            hits = [self._kv.find_cached_prefix(r) for r in gang]
            # One request needs blocks for what this step computes of it; a gang, for all
            # its tokens (its members then never wait on each other for blocks).
            budget = token_budget if len(gang) == 1 else None
            need = [(hit, self._num_tokens_after(r, hit, budget)) for r, hit in zip(gang, hits)]
            if self._kv.num_blocks_to_admit(need) > self._kv.num_free_blocks:
                break  # FCFS: nobody overtakes the head of the queue
            num_to_fork += num_to_add
            self._kv.take_cached_prefixes(hits)
            for req, hit_block_ids in zip(gang, hits):
                num_new = self._num_tokens_after(req, hit_block_ids, token_budget)
                self._waiting.remove(req)
                self._kv.allocate_for_admission(req, hit_block_ids, num_new)
                req.status = RequestStatus.RUNNING
                self._running.append(req)
                new_requests.append(req.new_request_data())
                counts.append(num_new)
                token_budget -= num_new
        return new_requests, counts

    def _num_tokens_after(self, req: Request, hit_block_ids: list[int], token_budget: int | None) -> int:
        """Tokens to compute after the cached prefix, with `token_budget` tokens left in the
        step (None: all of them)."""
        num_left = req.num_tokens - len(hit_block_ids) * self._kv.block_size
        return num_left if token_budget is None else min(num_left, token_budget)

    def _swap_in_swapped(self, token_budget: int) -> tuple[list[NewRequestData], list[int]]:
        """Swap in from the head of the swapped queue while budget, sequence slots and
        free blocks allow: fresh device blocks, copied into from the swap blocks at the
        start of the step, then scheduled like a running request."""
        new_requests: list[NewRequestData] = []
        counts: list[int] = []
        while self._swapped and token_budget > 0 and len(self._running) < self.config.max_num_running:
            req = self._swapped[0]
            num_new = num_tokens_to_schedule(req, token_budget)
            num_blocks = blocks_to_cover(req.num_computed_tokens + num_new, self._kv.block_size)
            if num_blocks > self._kv.num_free_blocks:
                break  # in order: nobody overtakes the head of the queue
            self._swapped.pop(0)
            self._kv.allocate_fresh(req, num_blocks)
            self._swap.swap_in(req)
            req.status = RequestStatus.RUNNING
            self._running.append(req)
            new_requests.append(req.new_request_data())
            counts.append(num_new)
            token_budget -= num_new
        return new_requests, counts

    def _make_room(self, index: int, num_members: int, num_blocks: int) -> bool:
        """Preempt running requests not yet scheduled in this step (`self._running[index:]`)
        until `num_blocks` are free for the gang `self._running[index : index + num_members]`.
        A victim that is a beam takes its whole group with it. False if the gang was
        itself the victim."""
        gang = self._running[index : index + num_members]
        while self._kv.num_free_blocks < num_blocks:
            victim = pick_preemption_victim(self._running[index:])
            if victim.beam_group is not None:
                for beam in gang_of(self._running[index:], victim):
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
        self._kv.free(req)
        if req.beam_group is not None:
            req.beam_group.reports.pop(req.request_id, None)  # it reports again after recomputing
        req.num_computed_tokens = 0
        req.num_pending_tokens = 0  # the step in flight's token, if any, is dropped with it
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self._num_preemptions_total += 1
        bisect.insort(self._waiting, req, key=waiting_order_key)
        self._dropped_ids.append(req.request_id)  # the executor drops its mirror

    def _swap_out(self, req: Request) -> bool:
        """Preempt by swap, if that is the mode and the swap pool has room (see
        swap_space.py); never a beam. Full blocks keep their hashes, so they stay in the
        prefix cache until evicted. False (nothing done) when the caller must preempt by
        recompute instead."""
        if self.config.limits.preemption_mode != "swap" or req.beam_group is not None or not self._swap.can_hold(req):
            return False
        if req.sampling_params.prompt_logprobs is not None and req.num_output_tokens == 0:
            # The executor's mirror holds its prompt logprobs so far and is dropped on
            # swap-out: recompute, which computes them all again.
            return False
        self._running.remove(req)
        self._swap.swap_out(req)
        self._kv.free(req)
        req.status = RequestStatus.SWAPPED
        req.num_preemptions += 1
        self._num_preemptions_total += 1
        bisect.insort(self._swapped, req, key=waiting_order_key)
        # The executor drops its mirror; the request comes back as a NewRequestData whose
        # K/V up to num_computed_tokens is already in place, like a prefix-cache hit.
        self._dropped_ids.append(req.request_id)
        return True

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Free everything a request holds. The caller takes it out of its queue."""
        if req.status == RequestStatus.RUNNING:
            self._dropped_ids.append(req.request_id)  # waiting and swapped ones are not mirrored
        self._kv.free(req)
        self._swap.release(req)
        req.status = status
        del self._requests[req.request_id]
        self._samples.forget_if_ended(req.client_request_id, self._requests)

