"""The bounds table (shared/sampling_bounds.py) is what SamplingParams.validate enforces:
for every bound, each edge it includes is accepted and the value just past each edge is
refused, with the field named in the error's `param` (not parsed from its text)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from pagedserve.shared.sampling_bounds import Bound, InvalidSamplingParam, sampling_bounds
from pagedserve.shared.sampling_params import SamplingParams

MAX_LOGPROBS = 7  # not the default: the table must take the deployment's cap
BOUNDS = sampling_bounds(MAX_LOGPROBS)
INTEGER_FIELDS = {
    field.name for field in msgspec.structs.fields(SamplingParams) if field.type in (int, int | None)
}


def params_with(bound: Bound, value: float) -> SamplingParams:
    """SamplingParams with `value` in the bound's field and nothing else unusual."""
    setting: Any = {5: value} if bound.each_value else value
    extra: dict[str, Any] = {"max_tokens": max(16, int(value) + 1)} if bound.field == "min_tokens" else {}
    return SamplingParams(**{bound.field: setting}, **extra)


def step(bound: Bound) -> float:
    return 1 if bound.field in INTEGER_FIELDS else 0.001


def edges(bound: Bound) -> list[tuple[float, bool]]:
    """(value, accepted) on both sides of each edge the bound has."""
    cases = []
    if bound.minimum is not None:
        if bound.exclusive_minimum:
            cases += [(bound.minimum, False), (bound.minimum + step(bound), True)]
        else:
            cases += [(bound.minimum, True), (bound.minimum - step(bound), False)]
    if bound.maximum is not None:
        cases += [(bound.maximum, True), (bound.maximum + step(bound), False)]
    return cases


@pytest.mark.parametrize("bound", BOUNDS, ids=[b.field for b in BOUNDS])
def test_validate_enforces_both_sides_of_each_bound(bound: Bound) -> None:
    assert edges(bound), f"{bound.field}: a bound with no edge"
    for value, accepted in edges(bound):
        params = params_with(bound, value)
        if accepted:
            params.validate(MAX_LOGPROBS)
            continue
        with pytest.raises(InvalidSamplingParam) as refused:
            params.validate(MAX_LOGPROBS)
        assert refused.value.param == bound.field, (value, str(refused.value))
        assert str(value) in str(refused.value) and bound.range_text() in str(refused.value)


def test_the_deployment_sets_the_logprobs_cap() -> None:
    SamplingParams(logprobs=20).validate()  # the default cap
    with pytest.raises(InvalidSamplingParam, match=r"logprobs must be in \[0, 7\]"):
        SamplingParams(logprobs=20).validate(MAX_LOGPROBS)


def test_rules_across_fields_name_their_field() -> None:
    cases = {
        "min_tokens": SamplingParams(max_tokens=4, min_tokens=5),
        "n": SamplingParams(beam_width=2, n=3),
        "prompt_logprobs": SamplingParams(beam_width=2, prompt_logprobs=1),
        "repetition_penalty": SamplingParams(beam_width=2, repetition_penalty=1.5),
        "logit_bias": SamplingParams(logit_bias={-1: 1.0}),
    }
    for param, params in cases.items():
        with pytest.raises(InvalidSamplingParam) as refused:
            params.validate()
        assert refused.value.param == param and isinstance(refused.value, ValueError)


def test_range_text_and_schema_keywords() -> None:
    top_p = Bound("top_p", minimum=0, exclusive_minimum=True, maximum=1)
    assert (top_p.range_text(), top_p.json_schema()) == ("in (0, 1]", {"exclusiveMinimum": 0, "maximum": 1})
    n = Bound("n", minimum=1)
    assert (n.range_text(), n.json_schema()) == ("at least 1", {"minimum": 1})
    assert [n.holds(v) for v in (0, 1, 10**9)] == [False, True, True]
