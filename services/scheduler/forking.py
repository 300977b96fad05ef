"""Forking: a new running sequence that shares its parent's blocks, the one mechanism
behind parallel samples and beam forks.

A fork starts where its parent is: the same prompt, the first `num_shared_output_tokens`
of its output, the same computed K/V, in the same blocks (one more reference each, see
`KVCacheManager.share`; copy-on-write before the first write into the shared, partly
filled last block). It reports under its parent's client id.

Parallel sampling (`SamplingParams.n > 1`): one request computes the prompt; in the step
where it samples its first token, `ExecuteStep.forked_requests` forks samples 1 .. n-1 off
it (ids f"{id}#{i}", params `for_sample(i)`: seed + i), which sample their first tokens
from its logits and become requests of their own when the result comes back. Deltas
report every sample under the request's id with its `sample_index`; each sample finishes,
and is preempted (recompute or swap, as an ordinary request), on its own, and aborting
the request aborts them all. `ParallelSamples` keeps that bookkeeping.

Beam forks (`beam_group.py`) go through the same `fork_request`, with the parent's whole
output and its sampling params.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from pagedserve.services.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.shared.messages import ForkedRequest
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.sequence_ids import sample_sequence_id
from pagedserve.shared.step_rules import samples_this_step


def fork_request(
    parent: Request,
    request_id: str,
    sampling_params: SamplingParams,
    num_shared_output_tokens: int,
    arrival_seq: int,
    kv_cache_manager: KVCacheManager,
) -> Request:
    """A running copy of `parent` holding its prompt, its first `num_shared_output_tokens`
    output tokens, its computed K/V and all its blocks. `arrival_seq`: a fresh one from the
    scheduler (its arrival time ties with its parent's, so it is preempted first)."""
    child = Request(
        request_id,
        parent.prompt_token_ids,
        sampling_params,
        arrival_time=parent.arrival_time,
        eos_token_id=parent.eos_token_id,
        priority=parent.priority,
        cache_salt=parent.cache_salt,
    )
    child.parent_request_id = parent.client_request_id
    child.arrival_seq = arrival_seq
    child.output_token_ids = parent.output_token_ids[:num_shared_output_tokens]
    child.num_computed_tokens = parent.num_computed_tokens
    child.num_cached_tokens = parent.num_cached_tokens
    kv_cache_manager.share(parent, child, parent.num_prompt_tokens + num_shared_output_tokens)
    child.status = RequestStatus.RUNNING
    return child


class ParallelSamples:
    """The samples forked off each request with `n > 1` while any of them is alive, so
    that aborting the request aborts them all and its end is known."""

    def __init__(self) -> None:
        self._sample_ids: dict[str, list[str]] = {}

    @staticmethod
    def num_to_fork(req: Request) -> int:
        """The samples `req` has yet to fork (n - 1 until its first token, then none)."""
        if req.beam_group is None and req.parent_request_id is None and req.num_output_tokens == 0:
            return req.sampling_params.n - 1
        return 0

    def forks_for_step(self, scheduled: Iterable[tuple[Request, int]]) -> list[ForkedRequest]:
        """The samples to fork off the (request, tokens scheduled) that sample their first
        token in this step: samples 1 .. n-1, as ids f"{id}#{i}". They become requests when
        the step's result comes back, sharing the parent's blocks."""
        forks: list[ForkedRequest] = []
        for req, num_new in scheduled:
            if self.num_to_fork(req) and samples_this_step(req.num_computed_tokens, num_new, req.num_tokens):
                request_id = req.request_id
                forks += [ForkedRequest(sample_sequence_id(request_id, i), request_id, i) for i in range(1, req.sampling_params.n)]
        return forks

    def add(self, sample: Request) -> None:
        self._sample_ids.setdefault(sample.client_request_id, []).append(sample.request_id)

    def with_samples(self, request_id: str) -> list[str]:
        """The request and the samples forked off it, alive or not."""
        return [request_id, *self._sample_ids.get(request_id, ())]

    def forget_if_ended(self, client_request_id: str, alive_ids: Container[str]) -> None:
        """Drop the record of the request's samples once none of them is alive."""
        if client_request_id in self._sample_ids and not any(
            i in alive_ids for i in self.with_samples(client_request_id)
        ):
            del self._sample_ids[client_request_id]
