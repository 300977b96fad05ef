"""The executor's mirror of one request, and that request's share of one step.

A request's token ids and sampling params cross the wire once (`NewRequestData`); the
mirror then grows by the deltas of later steps and by the tokens the executor samples
itself. Its block ids are also written, as an array row, into the persistent batch
(`input_batch.py`), which is what the kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.shared.messages import NewRequestData, TokenLogprobs
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.step_rules import samples_this_step

if TYPE_CHECKING:  # the grammar library loads only where a model runs
    from pagedserve.services.executor.structured_output import GrammarState


@dataclass
class RequestState:
    """One mirrored sequence (a request, or a sample or beam of one); it satisfies the
    sampler's SamplingRequest."""

    request_id: str
    token_ids: list[int]  # prompt + output so far: the scheduler's num_tokens is its length
    num_prompt_tokens: int
    block_ids: list[int]  # the block table as the scheduler sent it (its batch row copies it)
    sampling_params: SamplingParams
    # KV groups 1.. (sliding-window models): their tables, as `block_ids` is group 0's.
    group_block_ids: list[list[int]] = field(default_factory=list)
    # prompt_logprobs gathered over its prefill chunks, until its first token carries them.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Structured output: the sequence's grammar position (None: unconstrained). Derived
    # from its output tokens, so a rebuilt mirror (recompute, swap-in, failover) rebuilds it.
    grammar: GrammarState | None = None

    @classmethod
    def from_new_request(cls, new: NewRequestData) -> RequestState:
        return cls(
            new.request_id, list(new.token_ids), new.num_prompt_tokens, list(new.block_ids), new.sampling_params,
            group_block_ids=[list(table) for table in new.group_block_ids],
        )

    def fork(self, request_id: str, sampling_params: SamplingParams | None = None) -> RequestState:
        """A sequence branching off this one as it stands (a forked sample, with its own
        params, or a new beam): its own copies of the token ids and block table, so that
        either side's later deltas leave the other untouched."""
        return RequestState(
            request_id,
            list(self.token_ids),
            self.num_prompt_tokens,
            list(self.block_ids),
            self.sampling_params if sampling_params is None else sampling_params,
            group_block_ids=[list(table) for table in self.group_block_ids],
            grammar=None if self.grammar is None else self.grammar.fork(),
        )

    @property
    def is_beam(self) -> bool:
        """A beam of a beam search: not sampled; it reports its best next tokens, and the
        scheduler sends back the one it picked in `CachedRequestData.new_token_ids`."""
        return self.sampling_params.use_beam_search

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class ScheduledRequest:
    """A request run in this step: its tokens num_computed_tokens .. seq_len - 1."""

    state: RequestState
    num_computed_tokens: int
    num_new_tokens: int

    @property
    def seq_len(self) -> int:
        """Tokens in the cache once this step has run, this step's included."""
        return self.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        return samples_this_step(self.num_computed_tokens, self.num_new_tokens, len(self.state.token_ids))
