"""Matching a result to its step (services/scheduler/step_result.py): every disagreement is
caught, naming the step and the request, before anything changes."""

from __future__ import annotations

import pytest

from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.services.scheduler.step_result import match_result
from pagedserve.shared.messages import CachedRequestData, ExecuteStep, ForkedRequest, SampledToken, StepResult
from pagedserve.shared.sampling_params import SamplingParams


def running(request_id: str, prompt_len: int, num_computed_tokens: int) -> Request:
    req = Request(request_id, list(range(prompt_len)), SamplingParams(n=2), arrival_time=0.0)
    req.status = RequestStatus.RUNNING
    req.num_computed_tokens = num_computed_tokens
    return req


def make_step(counts: dict[str, int], forks: list[ForkedRequest] | None = None) -> ExecuteStep:
    return ExecuteStep(
        step_id=3,
        new_requests=[],
        cached_requests=[CachedRequestData(request_id, [], 0) for request_id in counts],
        num_scheduled_tokens=list(counts.values()),
        forked_requests=forks or [],
    )


def test_tokens_pair_with_their_requests_and_forks() -> None:
    requests = {"a": running("a", 8, 4), "b": running("b", 8, 0)}
    step = make_step({"a": 4, "b": 4}, [ForkedRequest("a#1", "a", 1)])
    matched = match_result(
        step, StepResult(3, [SampledToken("a", 11), SampledToken("a#1", 12)]), requests, [True, False]
    )
    # With the tokens computed once the step has run (the step says 0 before it, for both).
    assert [(r.request_id, n, t and t.token_id) for r, n, t in matched.updates] == [("a", 4, 11), ("b", 4, None)]
    assert [(f.request_id, t.token_id) for f, t in matched.forks_of["a"]] == [("a#1", 12)]
    assert matched.orphan_fork_ids == []


def test_requests_gone_while_the_step_ran_are_skipped_and_their_forks_orphaned() -> None:
    requests = {"b": running("b", 8, 0)}
    step = make_step({"a": 4, "b": 4}, [ForkedRequest("a#1", "a", 1)])
    matched = match_result(
        step, StepResult(3, [SampledToken("a", 11), SampledToken("a#1", 12)]), requests, [True, False]
    )
    assert [r.request_id for r, _, _ in matched.updates] == ["b"]
    assert matched.forks_of == {} and matched.orphan_fork_ids == ["a#1"]


@pytest.mark.parametrize(
    ("sampled", "match"),
    [
        ([], "step 3: request a sampled nothing"),
        ([SampledToken("a", 1), SampledToken("b", 2)], "step 3: request b sampled a token in the middle of its prompt"),
        ([SampledToken("a", 1), SampledToken("zz", 2)], r"step 3: tokens sampled for requests not in the step: \['zz'\]"),
    ],
)
def test_a_result_that_disagrees_with_its_step_is_rejected(sampled: list[SampledToken], match: str) -> None:
    requests = {"a": running("a", 8, 4), "b": running("b", 8, 0)}
    with pytest.raises(ValueError, match=match):
        match_result(make_step({"a": 4, "b": 4}), StepResult(3, sampled), requests, [True, False])


def test_a_fork_that_sampled_nothing_or_another_steps_result_is_rejected() -> None:
    requests = {"a": running("a", 8, 4)}
    step = make_step({"a": 4}, [ForkedRequest("a#1", "a", 1)])
    with pytest.raises(ValueError, match="forked sample a#1 sampled nothing"):
        match_result(step, StepResult(3, [SampledToken("a", 1)]), requests, [True])
    with pytest.raises(ValueError, match="result of step 4 applied to step 3"):
        match_result(step, StepResult(4, [SampledToken("a", 1)]), requests, [True])
