"""Steps scheduled whose results have not come back, and what scheduling one counts as
done: the bookkeeping behind asynchronous scheduling (vLLM's, rebuilt here).

A step's work counts the moment it is scheduled: its tokens as computed, the token each
sampling request will draw as pending (`Request.num_pending_tokens`). The executor runs
steps in order, so step n+1 may be scheduled on top of step n before n's result is in:
the executor fills in, from its own mirror, the token it sampled in step n. When n's
result comes, the pending token becomes an output token, or, if the request is over by
then, is dropped with it (the surplus token of step n+1 is dropped the same way).

Which requests of a step sample is decided when the step is scheduled and kept here: by
the time its result is read, later steps have moved the requests on.
"""

from __future__ import annotations

from collections.abc import Iterable

from pagedserve.services.scheduler.request import Request
from pagedserve.shared.messages import ExecuteStep
from pagedserve.shared.step_rules import samples_this_step


def count_as_scheduled(scheduled: Iterable[tuple[Request, int]]) -> list[bool]:
    """Advance each (request, tokens scheduled) of a step as if it had run; returns, per
    request, whether it samples a token in it."""
    samples: list[bool] = []
    for req, num_new in scheduled:
        sample = samples_this_step(req.num_computed_tokens, num_new, req.num_tokens_scheduled_for)
        req.num_computed_tokens += num_new
        req.num_pending_tokens += sample
        samples.append(sample)
    return samples


class StepsInFlight:
    """By step id, oldest first: per request of the step, whether it samples; and whether
    the step forks samples of n > 1 requests."""

    def __init__(self) -> None:
        self._steps: dict[int, tuple[list[bool], bool]] = {}

    def add(self, step: ExecuteStep, samples: list[bool]) -> None:
        self._steps[step.step_id] = (samples, bool(step.forked_requests))

    def samples(self, step_id: int) -> list[bool]:
        """ValueError for a step not in flight (answered already, or never scheduled)."""
        if step_id not in self._steps:
            raise ValueError(f"step {step_id} is not in flight")
        return self._steps[step_id][0]

    def finish(self, step_id: int) -> None:
        """Its result is applied. Steps before it that never came back (the service sends
        no step with nothing in it) are over too: results arrive in order."""
        for earlier in [i for i in self._steps if i <= step_id]:
            del self._steps[earlier]

    def clear(self) -> None:
        """The executor is gone: no result will come back."""
        self._steps.clear()

    def one_without_forks(self) -> bool:
        """Exactly one step in flight, forking no samples: the next may go ahead of its
        result (forks become requests only with it)."""
        return len(self._steps) == 1 and not next(iter(self._steps.values()))[1]
