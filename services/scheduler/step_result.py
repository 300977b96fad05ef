"""Matching an executor's result to the step it ran, checked whole before the scheduler
changes anything: a result that disagrees with its step means the executor's mirror has
drifted, and half-applying it would only make that worse.

Pure: reads the requests, changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.scheduler.request import Request, RequestStatus
from shared.messages import ExecuteStep, ForkedRequest, SampledToken, StepResult
from shared.step_rules import samples_this_step


@dataclass
class MatchedResult:
    # Per request of the step still running: (request, tokens scheduled, token sampled or
    # None), in step order.
    updates: list[tuple[Request, int, SampledToken | None]] = field(default_factory=list)
    # The samples forked off each parent still running, with their first tokens.
    forks_of: dict[str, list[tuple[ForkedRequest, SampledToken]]] = field(default_factory=dict)
    # Samples the executor forked off a parent aborted or preempted after the step was
    # scheduled: it must forget them.
    orphan_fork_ids: list[str] = field(default_factory=list)


def match_result(step: ExecuteStep, result: StepResult, requests: Mapping[str, Request]) -> MatchedResult:
    """Pair each sampled token with the request (or forked sample) of `step` it belongs
    to, skipping requests no longer running (aborted or preempted while the step ran).
    ValueError, naming the step and the request, when the result disagrees with the step:
    another step's result, a request that should have sampled and did not, a token in the
    middle of a prompt, a token for a sequence not in the step."""
    if result.step_id != step.step_id:
        raise ValueError(f"result of step {result.step_id} applied to step {step.step_id}")
    sampled = {token.sequence_id: token for token in result.sampled}
    scheduled_ids = [r.request_id for r in step.new_requests] + [r.request_id for r in step.cached_requests]
    matched = MatchedResult()
    for request_id, num_scheduled in zip(scheduled_ids, step.num_scheduled_tokens):
        token = sampled.pop(request_id, None)
        req = requests.get(request_id)
        if req is None or req.status != RequestStatus.RUNNING:
            continue  # aborted after the step was scheduled
        samples = samples_this_step(req.num_computed_tokens, num_scheduled, req.num_tokens)
        if samples and token is None:
            raise ValueError(f"step {step.step_id}: request {request_id} sampled nothing")
        if token is not None and not samples:
            raise ValueError(
                f"step {step.step_id}: request {request_id} sampled a token in the middle of its prompt"
            )
        matched.updates.append((req, num_scheduled, token))
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
