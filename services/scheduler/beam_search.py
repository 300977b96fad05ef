"""Beam search policy: which continuations survive a step, which hypotheses are done.

Pure: no blocks, no requests. The scheduler keeps one `BeamSearchState` per beam-search
request, runs every live beam one token, hands the beams' best next tokens (raw-logit
logprobs from the executor) to `select_beams`, and turns the outcome into block-table
work: a beam chosen once continues in place, one chosen k times forks k - 1 copies that
share its blocks (copy-on-write), one not chosen is freed at once.

The rules are HF transformers' (`GenerationMixin._beam_search`), so that greedy beam
search gives the same sequences for the same logits:
- all beams' (beam score + token logprob) compete; the best K = `num_beam_candidates`
  are kept;
- a candidate ending in a stop token, or reaching the length limit, is a finished
  hypothesis if it ranks among the first `beam_width`, scored by cumulative logprob /
  (generated tokens ** length_penalty); the `beam_width` best hypotheses are kept;
- the best `beam_width` candidates that did not finish are the next beams;
- the search ends when every candidate finished, when `early_stopping is True` and
  `beam_width` hypotheses are finished, or when the best running beam can no longer beat
  the worst kept hypothesis (at its current length; at the length limit with "never" and
  a positive length penalty).
Scores are float32 sums, as HF's tensors are, so near-ties fall the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from pagedserve.shared.sampling_params import SamplingParams

_F32 = np.float32


@dataclass(frozen=True)
class FinishedBeam:
    output_token_ids: list[int]  # generated tokens, the stop token included
    score: float  # cumulative logprob / generated length ** length_penalty
    finish_reason: str  # "stop" (a stop token) or "length"


@dataclass(frozen=True)
class BeamCandidate:
    parent: int  # index of the live beam it extends
    token_id: int
    score: float  # the beam's cumulative logprob with this token (a float32 value)


@dataclass
class BeamSearchState:
    beam_width: int
    num_candidates: int  # K: continuations kept per step
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int  # max_tokens, or less where the context ends first
    stop_token_ids: frozenset[int]
    num_generated: int = 0  # tokens each live beam has generated
    finished: list[FinishedBeam] = field(default_factory=list)  # best first, <= beam_width
    can_improve: bool = True  # HF's early-stop heuristic, sticky once false

    @classmethod
    def for_request(
        cls, params: SamplingParams, eos_token_id: int | None, num_prompt_tokens: int, max_model_len: int
    ) -> BeamSearchState:
        return cls(
            beam_width=params.beam_width,
            num_candidates=params.num_beam_candidates(eos_token_id),
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            max_new_tokens=min(params.max_tokens, max_model_len - num_prompt_tokens),
            stop_token_ids=params.beam_stop_token_ids(eos_token_id),
        )


@dataclass(frozen=True)
class LiveBeam:
    """What `select_beams` needs of one running beam."""

    score: float  # cumulative logprob of its generated tokens
    output_token_ids: Sequence[int]
    top_token_ids: Sequence[int]  # its best next tokens, best first
    top_logprobs: Sequence[float]


@dataclass(frozen=True)
class BeamSelection:
    next_beams: list[BeamCandidate]  # best first; empty when done
    done: bool


def _best_of_beam(parent: int, beam: LiveBeam, width: int, skip: frozenset[int], num_candidates: int) -> list[BeamCandidate]:
    """The beam's best `width` continuations whose token is not in `skip`, and any tied
    with the last of them (the step's order breaks ties by token id, the list may not)."""
    base = _F32(beam.score)
    taken: list[BeamCandidate] = []
    for token_id, logprob in islice(zip(beam.top_token_ids, beam.top_logprobs), num_candidates):
        if token_id in skip:
            continue
        score = float(base + _F32(logprob))
        if len(taken) >= width and score != taken[-1].score:
            break
        taken.append(BeamCandidate(parent, token_id, score))
    return taken


def select_beams(state: BeamSearchState, beams: Sequence[LiveBeam]) -> BeamSelection:
    """One beam-search step: updates `state` (hypotheses, length, heuristic) and says
    which continuations run next.

    HF ranks all K = (1 + stop ids) x width candidates of every beam; only two slices of
    that ranking matter: its first `width` (they may become hypotheses) and its first
    `width` that are not stop tokens (the next beams). Each beam's list is best first, so
    both come from its own first `width` (non-stop) entries: those are all that are
    ranked, and a step costs O(beams x width) whatever the stop list (it was a Python
    sort of beams x K, 341 ms a step at 16 beams x 8,192 candidates)."""
    width = state.beam_width
    pool: dict[tuple[int, int], BeamCandidate] = {}
    for parent, beam in enumerate(beams):
        for skip in (frozenset(), state.stop_token_ids):
            for candidate in _best_of_beam(parent, beam, width, skip, state.num_candidates):
                pool[(parent, candidate.token_id)] = candidate
    candidates = sorted(pool.values(), key=lambda c: (-c.score, c.parent, c.token_id))
    num_generated = state.num_generated + 1
    at_limit = num_generated >= state.max_new_tokens
    finishes = [at_limit or c.token_id in state.stop_token_ids for c in candidates]

    # Hypotheses: only candidates ranked within the beam width may join them.
    hypotheses_full = len(state.finished) >= state.beam_width
    if state.can_improve and not (hypotheses_full and state.early_stopping is True):
        denominator = _F32(num_generated**state.length_penalty)
        new = [
            FinishedBeam(
                list(beams[c.parent].output_token_ids) + [c.token_id],
                float(_F32(c.score) / denominator),
                "stop" if c.token_id in state.stop_token_ids else "length",
            )
            for c, finished in zip(candidates[: state.beam_width], finishes)
            if finished
        ]
        # Stable: an older hypothesis keeps its place on a tie, as in HF's merge.
        state.finished = sorted(state.finished + new, key=lambda h: -h.score)[: state.beam_width]

    next_beams = [c for c, finished in zip(candidates, finishes) if not finished][: state.beam_width]
    state.num_generated = num_generated
    if next_beams and len(state.finished) >= state.beam_width:
        if state.early_stopping == "never" and state.length_penalty > 0.0:
            best_length = state.max_new_tokens
        else:
            best_length = num_generated
        best_possible = _F32(next_beams[0].score) / _F32(best_length**state.length_penalty)
        state.can_improve = state.can_improve and bool(best_possible > _F32(state.finished[-1].score))
    done = (
        not next_beams
        or not state.can_improve
        or (len(state.finished) >= state.beam_width and state.early_stopping is True)
    )
    return BeamSelection([] if done else next_beams, done)
