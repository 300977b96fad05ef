"""Matching an executor's result to the step it ran, checked whole before the scheduler
changes anything: a result that disagrees with its step means the executor's mirror has
drifted, and half-applying it would only make that worse.

Pure: reads the requests, changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.shared.messages import ExecuteStep, ForkedRequest, SampledToken, StepResult


@dataclass
class MatchedResult:
    # Per request of the step still running: (request, its tokens with K/V in the cache
    # once this step has run, token sampled or None), in step order.
    updates: list[tuple[Request, int, SampledToken | None]] = field(default_factory=list)
    # The samples forked off each parent still running, with their first tokens.
    forks_of: dict[str, list[tuple[ForkedRequest, SampledToken]]] = field(default_factory=dict)
    # Samples the executor forked off a parent aborted or preempted after the step was
    # scheduled: it must forget them.
    orphan_fork_ids: list[str] = field(default_factory=list)


def match_result(
    step: ExecuteStep, result: StepResult, requests: Mapping[str, Request], expected_samples: Sequence[bool]
) -> MatchedResult:
    """Pair each sampled token with the request (or forked sample) of `step` it belongs
    to, skipping requests no longer running (aborted, finished or preempted while the step
    ran: with asynchronous scheduling a request that finished in the step before is still
    in this one, and its surplus token is dropped here). `expected_samples[i]`: whether the
    step's i-th request samples, as the scheduler decided when it scheduled the step (the
    request has moved on since, by later steps scheduled ahead).
    ValueError, naming the step and the request, when the result disagrees with the step:
    another step's result, a request that should have sampled and did not, a token in the
    middle of a prompt, a token for a sequence not in the step."""
    if result.step_id != step.step_id:
        raise ValueError(f"result of step {result.step_id} applied to step {step.step_id}")
    sampled = {token.sequence_id: token for token in result.sampled}
    scheduled = [(r.request_id, r.num_computed_tokens) for r in step.new_requests]
    scheduled += [(r.request_id, r.num_computed_tokens) for r in step.cached_requests]
    matched = MatchedResult()
    for (request_id, num_computed), num_scheduled, samples in zip(
        scheduled, step.num_scheduled_tokens, expected_samples
    ):
        token = sampled.pop(request_id, None)
        req = requests.get(request_id)
        if req is None or req.status != RequestStatus.RUNNING:
            continue  # aborted after the step was scheduled
        if samples and token is None:
            raise ValueError(f"step {step.step_id}: request {request_id} sampled nothing")
        if token is not None and not samples:
            raise ValueError(
                f"step {step.step_id}: request {request_id} sampled a token in the middle of its prompt"
            )
        matched.updates.append((req, num_computed + num_scheduled, token))
    for fork in step.forked_requests:
        token = sampled.pop(fork.request_id, None)
        parent = requests.get(fork.parent_request_id)
        if parent is None or parent.status != RequestStatus.RUNNING:
            matched.orphan_fork_ids.append(fork.request_id)
            continue
        if token is None:
            raise ValueError(f"step {step.step_id}: forked sample {fork.request_id} sampled nothing")
        matched.forks_of.setdefault(fork.parent_request_id, []).append((fork, token))
    if sampled:
        raise ValueError(f"step {step.step_id}: tokens sampled for requests not in the step: {sorted(sampled)}")
    return matched
