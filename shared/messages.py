"""Every message that crosses a process boundary, as msgspec Structs (MessagePack on the wire).

The scheduler -> executor step is a *delta*: a request's token ids and sampling params
travel once (in `NewRequestData`); afterwards only its new block ids and its progress
(`CachedRequestData`). The executor keeps a mirror of each request's token ids and block
table and appends the tokens it samples itself, so both sides agree without resending.
"""

from __future__ import annotations

import msgspec

from shared.sampling_params import SamplingParams

_PER_STEP = dict(array_like=True, omit_defaults=True, gc=False)


class NewRequestData(msgspec.Struct, **_PER_STEP):
    """A request the executor has not seen (or must rebuild after a preemption)."""

    request_id: str
    token_ids: list[int]  # prompt + tokens generated so far (non-empty after a recompute)
    num_prompt_tokens: int
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # tokens whose K/V are already in the cache (prefix hits)
    sampling_params: SamplingParams


class CachedRequestData(msgspec.Struct, **_PER_STEP):
    """A request the executor already mirrors: only what changed since the last step."""

    request_id: str
    new_block_ids: list[int]  # appended to the executor's copy of the block table
    num_computed_tokens: int  # before this step: position of the first token to compute


class ExecuteStep(msgspec.Struct, **_PER_STEP):
    """One model step. `num_scheduled_tokens[i]` belongs to the i-th request of
    `new_requests + cached_requests` (in that order)."""

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: list[int]
    # Requests the executor must forget before running this step (finished, aborted, or
    # preempted: a preempted request comes back later as a NewRequestData).
    finished_request_ids: list[str] = []


class SampledToken(msgspec.Struct, **_PER_STEP):
    request_id: str
    token_id: int
    logprob: float | None = None  # of the sampled token, when logprobs were asked for
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class StepResult(msgspec.Struct, **_PER_STEP):
    """Tokens sampled in one step, for the requests whose scheduled tokens reached the
    end of their known tokens (a chunk in the middle of a prompt samples nothing)."""

    step_id: int
    sampled: list[SampledToken]


class TokenLogprobs(msgspec.Struct, **_PER_STEP):
    logprob: float
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class RequestDelta(msgspec.Struct, **_PER_STEP):
    """What one step added to one request, as the scheduler reports it to its client."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] = []  # one per new token when logprobs were asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
