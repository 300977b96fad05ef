"""Beam search as the scheduler runs it: the live beams of one search, scheduled together
as a gang, and the round that turns the policy's choice (`beam_search.py`) into beams.

The request is the first beam of a `BeamGroup`. The executor never samples a beam; it
reports the raw logprobs of each beam's best next tokens, and once every live beam of the
group has reported, `select_beams` picks the next beams. A beam picked once takes its
token in place; one picked k times forks k - 1 new beams (`ExecuteStep.beam_forks`, ids
f"{id}#b{k}", through `forking.fork_request`) that share its blocks exactly as parallel
samples do, copy-on-write included; a beam not picked is freed at once. Chosen tokens
reach the executor in the next CachedRequestData (`new_token_ids`). Nothing is streamed:
when the search ends, the best n hypotheses come back as n deltas (sample_index 0 .. n-1),
each with all its tokens.

Gangs: a search's beams sit next to each other in the scheduler's running queue and get
their blocks as one, and are admitted and preempted (by recompute only, never swapped)
together: preempting some beams while others hold blocks and wait for them could stall
the search for good. A beam that has reported waits, scheduled for nothing, while the
rest of its group catches up; a beam preempted by recompute reports again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.services.scheduler.beam_search import BeamSearchState, BeamSelection, LiveBeam, select_beams
from pagedserve.shared.messages import RequestDelta, SampledToken
from pagedserve.shared.sequence_ids import beam_sequence_id

if TYPE_CHECKING:
    from pagedserve.services.scheduler.request import Request


@dataclass(eq=False)
class BeamGroup:
    """The live beams of one beam-search request and their scores. The first beam is the
    request itself (its id is the client's); forked beams are f"{id}#b{k}". Every live beam
    runs one token per round; the round ends, and `select_beams` runs, once each has
    reported its best next tokens."""

    client_request_id: str
    search: BeamSearchState
    n: int  # hypotheses returned
    beams: list[Request] = field(default_factory=list)  # best first
    scores: list[float] = field(default_factory=list)  # cumulative logprob, per beam
    # This round's reports, by beam id (a beam preempted by recompute reports again).
    reports: dict[str, SampledToken] = field(default_factory=dict)
    num_cached_tokens: int = 0
    num_forked: int = 0  # for fresh beam ids

    @classmethod
    def start(cls, req: Request, max_model_len: int) -> BeamGroup:
        """The search of a new beam-search request, whose only beam it is for now."""
        params = req.sampling_params
        search = BeamSearchState.for_request(params, req.eos_token_id, req.num_prompt_tokens, max_model_len)
        group = cls(req.request_id, search, params.n, beams=[req], scores=[0.0])
        req.beam_group = group
        return group

    @property
    def num_beams_to_add(self) -> int:
        """Beams the search will fork beyond its first, before its first round."""
        return self.search.beam_width - 1 if self.search.num_generated == 0 else 0

    @property
    def all_reported(self) -> bool:
        """Whether every live beam has reported this round's best next tokens."""
        return len(self.reports) == len(self.beams)

    def next_fork_id(self) -> str:
        self.num_forked += 1
        return beam_sequence_id(self.client_request_id, self.num_forked)

    def run_round(self, fork: Callable[[Request], Request]) -> tuple[bool, list[Request]]:
        """End a round: pick the next beams from the reports. Returns (done, beams to
        free): when the search is over, every beam; else the beams not picked, after the
        picked ones took their tokens and `fork(parent)` made the extra copies. Forks come
        first: they copy their parent's tokens and blocks before it takes its own token,
        and before an unpicked beam gives its blocks back."""
        if self.search.num_generated == 0:
            self.num_cached_tokens = self.beams[0].num_cached_tokens
        selection = self._select()
        if selection.done:
            return True, list(self.beams)
        continuing: set[int] = set()
        next_beams: list[Request] = []
        for candidate in selection.next_beams:
            parent = self.beams[candidate.parent]
            if candidate.parent in continuing:
                next_beams.append(fork(parent))
            else:
                continuing.add(candidate.parent)
                next_beams.append(parent)
        for beam, candidate in zip(next_beams, selection.next_beams):
            beam.output_token_ids.append(candidate.token_id)
            beam.unsent_token_ids.append(candidate.token_id)
        dropped = [beam for index, beam in enumerate(self.beams) if index not in continuing]
        self.beams = next_beams
        self.scores = [candidate.score for candidate in selection.next_beams]
        return False, dropped

    def hypothesis_deltas(self) -> list[RequestDelta]:
        """The best n hypotheses of a finished search, as deltas with all their tokens."""
        return [
            RequestDelta(
                self.client_request_id,
                hypothesis.output_token_ids,
                finish_reason=hypothesis.finish_reason,
                num_cached_tokens=self.num_cached_tokens,
                sample_index=index,
            )
            for index, hypothesis in enumerate(self.search.finished[: self.n])
        ]

    def abort_deltas(self) -> list[RequestDelta]:
        """One "abort" delta per hypothesis the client asked for."""
        return [
            RequestDelta(
                self.client_request_id, [], finish_reason="abort", num_cached_tokens=self.num_cached_tokens, sample_index=i
            )
            for i in range(self.n)
        ]

    def _select(self) -> BeamSelection:
        reports = [self.reports[beam.request_id] for beam in self.beams]
        live = [
            LiveBeam(score, beam.output_token_ids, report.top_token_ids, report.top_logprobs)
            for beam, score, report in zip(self.beams, self.scores, reports)
        ]
        self.reports.clear()
        return select_beams(self.search, live)


def gang_size(running: Sequence[Request], index: int) -> int:
    """How many requests from `running[index]` on must be scheduled (and preempted)
    together: the run of beams of its beam search, else 1."""
    group = running[index].beam_group
    if group is None:
        return 1
    size = 1
    while index + size < len(running) and running[index + size].beam_group is group:
        size += 1
    return size


def gang_of(queue: Sequence[Request], req: Request) -> list[Request]:
    """`req` and every other beam of its search in `queue`, in queue order; `[req]` for a
    request that is not a beam."""
    if req.beam_group is None:
        return [req]
    return [r for r in queue if r.beam_group is req.beam_group]
