"""Every message that crosses a process boundary, as msgspec Structs (MessagePack on the wire).

The scheduler -> executor step is a *delta*: a request's token ids and sampling params
travel once (in `NewRequestData`); afterwards only its new block ids and its progress
(`CachedRequestData`). The executor keeps a mirror of each request's token ids and block
table and appends the tokens it samples itself, so both sides agree without resending.
"""

from __future__ import annotations

import msgspec

from pagedserve.shared.sampling_params import SamplingParams

_PER_STEP = dict(array_like=True, omit_defaults=True, gc=False)


class NewRequestData(msgspec.Struct, **_PER_STEP):
    """A request the executor has not seen (or must rebuild after a preemption)."""

    request_id: str
    token_ids: list[int]  # prompt + tokens generated so far (non-empty after a recompute)
    num_prompt_tokens: int
    block_ids: list[int]  # the whole block table (of KV group 0)
    num_computed_tokens: int  # tokens whose K/V are already in the cache (prefix hits)
    sampling_params: SamplingParams
    # Models with more than one KV group (sliding-window layers beside global ones): the
    # whole tables of groups 1, 2, ...; empty (and not sent) with one group.
    group_block_ids: list[list[int]] = []


class CachedRequestData(msgspec.Struct, **_PER_STEP):
    """A request the executor already mirrors: only what changed since the last step."""

    request_id: str
    new_block_ids: list[int]  # appended to the executor's copy of the block table
    num_computed_tokens: int  # before this step: position of the first token to compute
    # Copy-on-write: drop this many blocks (0 or 1: a shared, partly filled last block)
    # from the end of the table before appending `new_block_ids`, whose first id is then
    # the private copy (listed in `ExecuteStep.block_copies`).
    num_replaced_blocks: int = 0
    # Beam search: tokens the scheduler chose for this beam since the executor last saw
    # it (the executor never appends a beam's own argmax), appended before computing.
    new_token_ids: list[int] = []
    # KV groups 1, 2, ... (none with one group): each group's table delta, as
    # `new_block_ids` and `num_replaced_blocks` are group 0's.
    group_new_block_ids: list[list[int]] = []
    group_num_replaced_blocks: list[int] = []


class ForkedRequest(msgspec.Struct, **_PER_STEP):
    """Sample `sample_index` of a parallel-sampling request (`n > 1`) branching off its
    parent, which samples its first token in this step. The executor mirrors it as a copy
    of the parent (token ids before this step's token, block table) with the params
    `parent params.for_sample(sample_index)`, and samples its first token from the
    parent's logits: the prompt is computed once and never resent."""

    request_id: str  # the new sample's own id
    parent_request_id: str
    sample_index: int


class BeamFork(msgspec.Struct, **_PER_STEP):
    """Beam search: a new beam branching off a live one (chosen more than once in the
    last round). The executor mirrors it as a copy of the parent as it stands before this
    step, token ids and block table; its own next token and copy-on-write arrive in its
    CachedRequestData like any beam's."""

    request_id: str
    parent_request_id: str


class ExecuteStep(msgspec.Struct, **_PER_STEP):
    """One model step. `num_scheduled_tokens[i]` belongs to the i-th request of
    `new_requests + cached_requests` (in that order)."""

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: list[int]
    # Requests the executor must drop from its mirror before running this step: finished,
    # aborted, or preempted (a preempted request comes back later as a NewRequestData).
    dropped_request_ids: list[str] = []
    # (source, destination) block ids whose K and V, in every layer, the executor copies
    # before running the model (copy-on-write of a block shared by forked samples).
    block_copies: list[tuple[int, int]] = []
    # Samples branching off requests of this step, applied after its forward.
    forked_requests: list[ForkedRequest] = []
    # Preemption by swap, as (source, destination) block id pairs. The executor copies
    # every swap-out (device block -> CPU swap block) first, then every swap-in (swap block
    # -> device block), then runs the step: a block swapped out may be reallocated, and
    # written, in this very step, and a swapped-in request reads its K/V in it.
    swap_out: list[tuple[int, int]] = []
    swap_in: list[tuple[int, int]] = []
    # Beam forks, applied before anything else in the step (even `dropped_request_ids`:
    # a parent dropped or preempted in this step is still copied as it was).
    beam_forks: list[BeamFork] = []


class SampledToken(msgspec.Struct, **_PER_STEP):
    """One sequence's token. A sequence is a request, or one sample or beam of it
    (f"{id}#{i}", f"{id}#b{k}"): unlike `RequestDelta.request_id`, not the client's id."""

    sequence_id: str
    token_id: int
    logprob: float | None = None  # of the sampled token, when logprobs were asked for
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []
    # Set on the first token of a request that asked for prompt_logprobs: one entry per
    # prompt token after the first (accumulated by the executor over prefill chunks).
    prompt_logprobs: list[TokenLogprobs] = []


class StepResult(msgspec.Struct, **_PER_STEP):
    """Tokens sampled in one step, for the requests whose scheduled tokens reached the
    end of their known tokens (a chunk in the middle of a prompt samples nothing)."""

    step_id: int
    sampled: list[SampledToken]


class TokenLogprobs(msgspec.Struct, **_PER_STEP):
    logprob: float
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []
    rank: int | None = None  # 1 + how many tokens were likelier (prompt logprobs set it, as vLLM does)


class RequestDelta(msgspec.Struct, **_PER_STEP):
    """What one step added to one request, as the scheduler reports it to its client."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] = []  # one per new token when logprobs were asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Which of the request's `n` samples the tokens belong to (0 .. n-1); `request_id` is
    # the request's, whichever sample it is. Each sample finishes on its own.
    sample_index: int = 0
    # True on the last delta of the request as a whole (every sample, or the whole beam
    # search, has finished): the scheduler core decides it once; nobody else counts.
    request_finished: bool = False
    # On the first delta of a request that asked for prompt_logprobs: prompt tokens 1..P-1
    # (token 0 has none), computed in the prefill, never from prefix-cache hits.
    prompt_logprobs: list[TokenLogprobs] = []
    # 1, 2, 3... over the deltas the scheduler sends for the request: the gateway's ROUTER
    # drops messages at its high-water mark, and a gap means tokens are missing (the
    # gateway fails the request rather than stream a hole). 0: not numbered.
    seq: int = 0


# ---------------------------------------------------------------------------------------
# Gateway <-> scheduler (gateway DEALER -> scheduler ROUTER). Tagged so one decoder reads
# any of them; the ROUTER identity says which gateway sent it.
# ---------------------------------------------------------------------------------------


class SubmitRequest(msgspec.Struct, tag="submit", array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float  # wall clock (time.time()) at the gateway
    priority: int = 0  # lower = more important
    cache_salt: str | None = None  # mixed into the block hashes: shares blocks only with its own salt


class AbortRequest(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]
    # Empty: abort the requests whole. Else abort only these samples of each (n > 1: a
    # stop string ended them at the gateway), the others going on.
    sample_indices: list[int] = []


class GatewayHeartbeat(msgspec.Struct, tag="gateway_heartbeat", array_like=True):
    """Sent by a gateway about once a second: a scheduler aborts the requests of one it
    has heard beat before and no longer hears (it died), freeing their blocks."""

    gateway_id: str
    sent_at: float


class StatusQuery(msgspec.Struct, tag="status", array_like=True):
    """Ask for the whole admin snapshot (every queue, every block's owner): for
    /admin/scheduler only; everything else asks the far cheaper InfoQuery."""

    query_id: int


class InfoQuery(msgspec.Struct, tag="info", array_like=True):
    """Ask for the scheduler's counts (SchedulerInfo), and which of `request_ids` it still
    holds: what /health, /metrics, the context length and a stalled request's check need,
    answered from counters without listing a single request or block."""

    query_id: int
    request_ids: list[str] = []


GatewayMessage = SubmitRequest | AbortRequest | StatusQuery | InfoQuery | GatewayHeartbeat


class RequestDeltas(msgspec.Struct, tag="deltas", array_like=True, gc=False):
    """Everything one step produced for the requests of one gateway."""

    deltas: list[RequestDelta]


class RequestError(msgspec.Struct, tag="error", array_like=True):
    """A request the scheduler refused or had to end; `status_code` is the HTTP status
    the gateway should answer with (400 invalid, 429 queue full, 503 no executor)."""

    request_id: str
    status_code: int
    message: str
    retry_after_s: float = 0.0


class RequestSummary(msgspec.Struct):
    """One waiting, running or swapped request as the admin snapshot lists it."""

    request_id: str
    status: str  # waiting | running | swapped
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    max_tokens: int
    num_preemptions: int
    arrival_time: float
    block_ids: list[int]
    # A forked sample (n > 1) lists under its own id, f"{parent}#{i}"; this is the parent's,
    # the id its client knows. None for a request itself.
    parent_request_id: str | None = None


class PrefixCacheStats(msgspec.Struct):
    """Prefix-cache lookups since the scheduler started (one per admission; a request
    resumed after preemption looks up again). The scheduler core counts into this very
    struct; the admin snapshot sends a copy of it."""

    num_queries: int = 0  # admissions that looked up the cache
    num_hits: int = 0  # admissions that reused at least one cached block
    num_query_tokens: int = 0  # tokens of the admitted requests
    num_hit_tokens: int = 0  # tokens whose K/V came from the cache instead of the model
    # num_hit_tokens / num_query_tokens (0.0 before any lookup): a field, not a property,
    # so that it is on the wire; `record` keeps it current.
    hit_rate: float = 0.0

    def record(self, num_tokens: int, num_hit_tokens: int) -> None:
        """One admission of a request of `num_tokens` tokens, `num_hit_tokens` of them cached."""
        self.num_queries += 1
        self.num_hits += int(num_hit_tokens > 0)
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens
        self.hit_rate = self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


class BlockPoolStatus(msgspec.Struct):
    num_blocks: int
    block_size: int
    num_free_blocks: int  # empty + cached: what allocation can hand out
    num_used_blocks: int  # referenced by a request
    num_cached_blocks: int  # nobody's, kept for their prefix until evicted (part of free)
    num_shared_blocks: int
    tokens_stored: int
    slots_allocated: int
    utilisation: float  # tokens stored / slots allocated
    block_owners: list[str]  # per block: owning request id, "" when free ("*" marks shared)
    prefix_cache: PrefixCacheStats | None = None  # None when prefix caching is off
    # The executor's CPU swap pool (preemption by swap): capacity and blocks held by
    # swapped-out requests; 0 and 0 when it has none.
    num_swap_blocks: int = 0
    num_used_swap_blocks: int = 0
    num_swap_outs: int = 0  # preemptions by swap (StepStats.num_preemptions counts all)
    num_swap_ins: int = 0


class ExecutorStatus(msgspec.Struct):
    executor_id: str
    device: str
    num_blocks: int
    model: str
    last_heartbeat_age_s: float
    alive: bool
    # Tensor parallel: the group this executor is one rank of (its executor id for T = 1).
    group_id: str = ""
    rank: int = 0
    world_size: int = 1


class ExecutorEvent(msgspec.Struct):
    """An executor joining or being lost, as the admin status lists them (newest last)."""

    at: float  # wall clock (time.time())
    executor_id: str
    event: str  # joined | lost
    detail: str  # its capacity when it joined; why it counts as lost
    num_requeued: int  # running requests sent back to the waiting queue for recompute


class StepStats(msgspec.Struct):
    num_steps: int
    steps_per_s: float
    mean_batch_size: float
    mean_tokens_per_step: float
    num_preemptions: int


class StatusSnapshot(msgspec.Struct, tag="snapshot", array_like=True):
    query_id: int
    model: str
    max_model_len: int
    running: list[RequestSummary]
    waiting: list[RequestSummary]
    swapped: list[RequestSummary]
    block_pool: BlockPoolStatus | None  # None until an executor reported its capacity
    executors: list[ExecutorStatus]
    steps: StepStats
    uptime_s: float
    # Executor loss: how many times the serving executor was lost (died, or went silent
    # for the heartbeat timeout), and the recent joins and losses.
    num_executors_lost: int = 0
    executor_events: list[ExecutorEvent] = []


class SchedulerInfo(msgspec.Struct, tag="scheduler_info", array_like=True):
    """The answer to an InfoQuery. Model, context length and pool numbers are 0 or ""
    until an executor has joined."""

    query_id: int
    replica_id: str
    model: str
    max_model_len: int
    num_executors_alive: int
    num_running: int  # sequences: a request's forked samples or beams count one each
    num_waiting: int
    num_swapped: int
    num_blocks: int
    num_used_blocks: int  # referenced by a request
    num_free_blocks: int  # empty + cached: what allocation can hand out
    kv_utilisation: float  # tokens stored / slots allocated over running requests (0.0: none)
    steps: StepStats
    held_request_ids: list[str] = []  # those of the query's `request_ids` it still serves


SchedulerToGateway = RequestDeltas | RequestError | StatusSnapshot | SchedulerInfo


# ---------------------------------------------------------------------------------------
# Scheduler <-> executor (executor DEALER -> scheduler ROUTER).
# ---------------------------------------------------------------------------------------


class ExecutorReady(msgspec.Struct, tag="ready", array_like=True):
    """Sent once after the model is loaded and the KV cache allocated."""

    executor_id: str
    num_blocks: int
    block_size: int
    model: str
    device: str
    max_model_len: int
    eos_token_id: int | None
    num_swap_blocks: int = 0  # its CPU swap pool for preemption by swap (0: none)
    # Tensor parallel: one rank of `world_size` in the group `group_id`; the scheduler
    # serves with a group once all its ranks have announced themselves.
    group_id: str = ""
    rank: int = 0
    world_size: int = 1
    # Its KV groups' sliding windows (None: global), `shared/kv_group_layout.py`; empty:
    # one global group.
    kv_group_windows: list[int | None] = []
    # The model's vocabulary: the scheduler refuses token ids outside it (an embedding
    # lookup past the table would crash the executor). 0: not reported, not checked.
    vocab_size: int = 0


class Heartbeat(msgspec.Struct, tag="heartbeat", array_like=True):
    executor_id: str
    sent_at: float


class StepMessage(msgspec.Struct, tag="step", array_like=True, gc=False):
    step: ExecuteStep


class StepResultMessage(msgspec.Struct, tag="result", array_like=True, gc=False):
    result: StepResult


ExecutorMessage = ExecutorReady | Heartbeat | StepResultMessage

PROTOCOL_VERSION = b"pagedserve.1"
