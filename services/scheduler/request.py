"""One generation request as the scheduler tracks it.

A plain class, not a message: it is mutated every step and never crosses a process
boundary (the executor gets `NewRequestData` / `CachedRequestData` built from it).

Progress is two counters, as in vLLM v1: `num_tokens` (prompt + output so far) and
`num_computed_tokens` (how many of those have their K/V in the cache, or will have once
the steps already scheduled have run: it advances when a step is scheduled). A step
computes some of the difference; prefill, chunked prefill, decode and recompute after
preemption are all the same operation. A token sampled in a step still in flight is
pending (`num_pending_tokens`) until its result arrives.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from pagedserve.shared.messages import CachedRequestData, NewRequestData, RequestDelta, SampledToken, TokenLogprobs
from pagedserve.shared.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.services.scheduler.beam_group import BeamGroup


class RequestStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    SWAPPED = 2  # preempted by swap: its K/V wait in the executor's CPU swap pool
    # Everything from here on is finished; `Request.is_finished` relies on the order.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5


_FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "eos_token_id",
        "arrival_time",
        "priority",
        "cache_salt",
        "arrival_seq",
        "output_token_ids",
        "num_computed_tokens",
        "block_ids",
        "group_block_ids",
        "num_dropped_blocks",
        "swap_block_ids",
        "status",
        "num_preemptions",
        "block_hashes",
        "num_registered_blocks",
        "num_cached_tokens",
        "parent_request_id",
        "sample_index",
        "beam_group",
        "unsent_token_ids",
        "num_pending_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        arrival_time: float,
        eos_token_id: int | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        # arrival_time has no default on purpose: mixing clocks (wall vs monotonic) would
        # silently break FCFS order and the choice of preemption victim.
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time
        self.priority = priority  # lower = more important
        self.cache_salt = cache_salt  # in its first block's hash (shared/block_hashing.py)
        # Set by the scheduler when the request is added: breaks arrival_time ties so
        # ordering is total and deterministic.
        self.arrival_seq = -1

        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []  # the block table; the scheduler owns these refs
        # More KV groups than one (`kv_groups.py`): the tables of groups 1.. (block_ids is
        # group 0's), and per group how many leading entries a sliding window dropped
        # (DROPPED there). Both empty with one global group, as for every Llama.
        self.group_block_ids: list[list[int]] = []
        self.num_dropped_blocks: list[int] = []
        # While SWAPPED: the swap blocks holding the K/V of `block_ids` as they were at
        # swap-out, in block-table order (the scheduler owns these too; `block_ids` is empty).
        self.swap_block_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        # Prefix caching (empty/zero when it is off). The hashes of the full blocks of
        # prompt + output, kept across preemption (they depend on the tokens only).
        self.block_hashes: list[bytes] = []
        # How many leading blocks of `block_ids` are full, computed and were offered to the
        # prefix cache (a hit counts: those blocks came from it). Not the pool's
        # `num_cached_blocks` (unreferenced blocks kept for their prefix).
        self.num_registered_blocks = 0
        # Prompt tokens served from the prefix cache at first admission (for the client).
        self.num_cached_tokens = 0
        # Parallel sampling: sample `sample_index` of request `parent_request_id` (None for
        # the request itself, sample 0), forked off it when its first token was sampled.
        self.parent_request_id: str | None = None
        self.sample_index = 0
        # Beam search: the group this request is a beam of (None otherwise). A beam's
        # tokens are chosen by the scheduler, not sampled by the executor, so the ones
        # the executor has not been told yet wait here for the next CachedRequestData.
        self.beam_group: BeamGroup | None = None
        self.unsent_token_ids: list[int] = []
        # Tokens the executor samples in steps already scheduled whose results have not
        # come back (0 or 1 synchronously; up to 2 with asynchronous scheduling, where
        # step n+1 is scheduled while step n runs). The executor appends them to its own
        # mirror; here they count for scheduling only, and `output_token_ids` gets each
        # when its result arrives.
        self.num_pending_tokens = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens known here (pending ones excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_scheduled_for(self) -> int:
        """Tokens the executor will know once the steps in flight have run: `num_tokens`
        plus the pending ones. What the next step computes up to."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def all_token_ids(self) -> list[int]:
        """A new list (prompt + output): safe to hand to a message."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def client_request_id(self) -> str:
        """The id the client knows: a forked sample reports under its parent's."""
        return self.parent_request_id or self.request_id

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """"stop" | "length" | "abort", or None while it is still alive."""
        return _FINISH_REASONS.get(self.status)

    def new_request_data(self) -> NewRequestData:
        """The request in full, for an executor that does not mirror it yet (first
        admission, resumption after recompute, or swap-in into fresh blocks). Every token
        goes with it, so a beam has none left unsent."""
        assert not self.num_pending_tokens, f"{self!r}: a token of a step in flight is not known yet"
        self.unsent_token_ids = []
        if not self.num_dropped_blocks:
            block_ids, group_block_ids = list(self.block_ids), []
        else:  # the executor gets block 0 for a dropped block: no kernel reads it
            block_ids = [max(b, 0) for b in self.block_ids]
            group_block_ids = [[max(b, 0) for b in table] for table in self.group_block_ids]
        return NewRequestData(
            request_id=self.request_id,
            token_ids=self.all_token_ids,
            num_prompt_tokens=self.num_prompt_tokens,
            block_ids=block_ids,
            num_computed_tokens=self.num_computed_tokens,
            sampling_params=self.sampling_params,
            group_block_ids=group_block_ids,
        )

    def cached_request_data(
        self, new_block_ids: list[int], num_replaced_blocks: int, group_deltas: list[tuple[list[int], int]] = ()
    ) -> CachedRequestData:
        """What changed for an executor that mirrors the request: the blocks new to its
        table (the first `num_replaced_blocks` of them replace the end of the table), the
        same for the tables of KV groups 1.. (`group_deltas`), and the tokens it has not
        been told (a beam's, chosen by the scheduler)."""
        data = CachedRequestData(
            self.request_id,
            new_block_ids,
            self.num_computed_tokens,
            num_replaced_blocks=num_replaced_blocks,
            new_token_ids=self.unsent_token_ids,
        )
        if group_deltas:
            data.group_new_block_ids = [ids for ids, _ in group_deltas]
            data.group_num_replaced_blocks = [num for _, num in group_deltas]
        self.unsent_token_ids = []
        return data

    def delta(self, token: SampledToken | None) -> RequestDelta:
        """What the client hears of this sequence after a step: the token it sampled (None
        when it was aborted), under the client's request id and its sample index."""
        logprobs: list[TokenLogprobs] = []
        if token is not None and token.logprob is not None:
            logprobs.append(TokenLogprobs(token.logprob, token.top_token_ids, token.top_logprobs))
        return RequestDelta(
            self.client_request_id,
            [] if token is None else [token.token_id],
            logprobs,
            finish_reason=self.finish_reason,
            num_cached_tokens=self.num_cached_tokens,
            sample_index=self.sample_index,
            prompt_logprobs=[] if token is None else token.prompt_logprobs,
        )

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
