"""The pure beam-search step (`select_beams`) on hand-made candidates: which
continuations survive, which become hypotheses and with what score, when it stops.
(Equality with HF transformers' beam search on real models: tests/engine/test_beam_search.py.)"""

from __future__ import annotations

import math

import pytest

from pagedserve.services.scheduler.beam_search import BeamSearchState, LiveBeam, select_beams
from pagedserve.shared.sampling_params import SamplingParams

EOS = 0


def state(width: int = 2, *, length_penalty: float = 1.0, early_stopping: bool | str = False, max_new_tokens: int = 10) -> BeamSearchState:
    params = SamplingParams(max_tokens=max_new_tokens, beam_width=width, length_penalty=length_penalty, early_stopping=early_stopping)
    return BeamSearchState.for_request(params, EOS, num_prompt_tokens=5, max_model_len=1000)


def beam(score: float, outputs: list[int], candidates: dict[int, float]) -> LiveBeam:
    ranked = sorted(candidates.items(), key=lambda item: -item[1])
    return LiveBeam(score, outputs, [t for t, _ in ranked], [lp for _, lp in ranked])


def test_candidates_compete_across_beams_and_the_best_width_survive() -> None:
    s = state(2)
    assert s.num_candidates == 4  # 2 x width with one stop token
    selection = select_beams(
        s,
        [
            beam(-1.0, [7], {10: -0.1, 11: -3.0, 12: -4.0}),
            beam(-2.0, [8], {20: -0.2, 21: -0.3, 22: -5.0}),
        ],
    )
    assert not selection.done
    assert [(c.parent, c.token_id) for c in selection.next_beams] == [(0, 10), (1, 20)]
    assert selection.next_beams[0].score == pytest.approx(-1.1)
    assert s.num_generated == 1 and s.finished == []


def test_a_stop_token_ranked_within_the_width_becomes_a_hypothesis_scored_by_length() -> None:
    s = state(2, length_penalty=1.0)
    s.num_generated = 2  # each beam holds 2 tokens; the stop token makes 3
    selection = select_beams(s, [beam(-1.0, [7, 8], {EOS: -0.5, 10: -0.6}), beam(-1.2, [7, 9], {11: -0.1, EOS: -0.2})])
    # Ranked: (0, EOS) -1.5, (0, 10) -1.6, (1, 11) -1.3 ... sorted: (1,11) -1.3, (1,EOS) -1.4, (0,EOS) -1.5, (0,10) -1.6
    assert [(h.output_token_ids, h.finish_reason) for h in s.finished] == [([7, 9, EOS], "stop")]
    assert s.finished[0].score == pytest.approx(-1.4 / 3)
    # (0, EOS) ranked third, outside the width: not a hypothesis. The running beams skip stops.
    assert [(c.parent, c.token_id) for c in selection.next_beams] == [(1, 11), (0, 10)]
    assert not selection.done


def test_length_penalty_divides_by_generated_length_to_its_power() -> None:
    s = state(1, length_penalty=2.0)
    s.num_generated = 3
    select_beams(s, [beam(-2.0, [1, 2, 3], {EOS: -1.0, 5: -1.5})])
    assert s.finished[0].score == pytest.approx(-3.0 / 4**2)


def test_max_tokens_ends_the_search_with_the_best_width_as_length_hypotheses() -> None:
    s = state(2, max_new_tokens=3)
    s.num_generated = 2
    selection = select_beams(s, [beam(-1.0, [1, 2], {5: -0.1, 6: -0.2}), beam(-1.5, [1, 3], {7: -0.1})])
    assert selection.done and selection.next_beams == []
    assert [(h.output_token_ids, h.finish_reason) for h in s.finished] == [([1, 2, 5], "length"), ([1, 2, 6], "length")]


def test_early_stopping_true_stops_once_width_hypotheses_are_finished() -> None:
    s = state(2, early_stopping=True)
    s.num_generated = 1
    selection = select_beams(s, [beam(-1.0, [1], {EOS: -0.1, 4: -0.2}), beam(-1.1, [2], {EOS: -0.05, 6: -5.0})])
    assert len(s.finished) == 2 and selection.done


def test_early_stopping_false_stops_when_no_running_beam_can_win() -> None:
    # Two finished hypotheses at -0.5 per token; the best running beam is at -4 over 2 tokens.
    s = state(2, early_stopping=False)
    s.num_generated = 1
    selection = select_beams(s, [beam(-0.9, [1], {EOS: -0.1, 4: -3.1}), beam(-0.9, [2], {EOS: -0.1, 6: -3.5})])
    assert len(s.finished) == 2 and s.finished[0].score == pytest.approx(-0.5)
    assert selection.done and not s.can_improve


def test_never_measures_the_running_beam_at_the_length_limit() -> None:
    # Same beams as above with "never" and a positive length penalty: at the limit (10
    # tokens) the running beam's -4 / 10 would beat -0.5, so the search goes on.
    s = state(2, early_stopping="never", max_new_tokens=10)
    s.num_generated = 1
    selection = select_beams(s, [beam(-0.9, [1], {EOS: -0.1, 4: -3.1}), beam(-0.9, [2], {EOS: -0.1, 6: -3.5})])
    assert not selection.done and s.can_improve


def test_scores_are_float32_sums() -> None:
    s = state(1)
    selection = select_beams(s, [beam(0.1, [1], {4: 0.2, 5: -9.0})])
    assert selection.next_beams[0].score != 0.1 + 0.2
    assert math.isclose(selection.next_beams[0].score, 0.3, rel_tol=1e-6)


def test_sampling_params_check_beam_search_fields() -> None:
    with pytest.raises(ValueError, match="^n must be at most beam_width"):
        SamplingParams(beam_width=2, n=3).validate()
    with pytest.raises(ValueError, match="^logprobs"):
        SamplingParams(beam_width=2, logprobs=1).validate()
    with pytest.raises(ValueError, match="^beam_width"):
        SamplingParams(beam_width=0).validate()
    with pytest.raises(ValueError, match="^repetition_penalty"):
        SamplingParams(beam_width=2, repetition_penalty=1.2).validate()
    SamplingParams(beam_width=4, n=4, length_penalty=-1.0, early_stopping="never").validate()
    assert SamplingParams(beam_width=3, stop_token_ids=[5, 6]).num_beam_candidates(EOS) == 12
