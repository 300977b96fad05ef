"""The executor's mirror of one sequence: built once from its NewRequestData, forked into
independent copies, and the sampling rule it shares with the scheduler."""

from __future__ import annotations

from pagedserve.services.executor.request_state import RequestState, ScheduledRequest
from pagedserve.shared.messages import NewRequestData
from pagedserve.shared.sampling_params import SamplingParams


def test_a_mirror_owns_its_lists_apart_from_the_message() -> None:
    new = NewRequestData("a", [5, 6, 7, 8], 3, [2, 9], 2, SamplingParams(seed=4))
    state = RequestState.from_new_request(new)
    new.token_ids.append(99)
    new.block_ids.append(99)
    assert (state.token_ids, state.block_ids) == ([5, 6, 7, 8], [2, 9])
    assert (state.prompt_token_ids, state.output_token_ids) == ([5, 6, 7], [8])
    assert state.sampling_params.seed == 4 and not state.is_beam


def test_a_fork_copies_tokens_and_table_and_takes_its_own_params() -> None:
    parent = RequestState("a", [1, 2, 3], 2, [4, 5], SamplingParams(seed=10, n=3))
    sample = parent.fork("a#2", parent.sampling_params.for_sample(2))
    beam = parent.fork("a#b1")
    sample.token_ids.append(7)
    sample.block_ids[-1] = 8
    assert (parent.token_ids, parent.block_ids) == ([1, 2, 3], [4, 5])
    assert (sample.request_id, sample.token_ids, sample.block_ids) == ("a#2", [1, 2, 3, 7], [4, 8])
    assert sample.sampling_params.seed == 12
    assert beam.sampling_params is parent.sampling_params and beam.num_prompt_tokens == 2


def test_a_scheduled_request_samples_only_when_it_reaches_its_last_known_token() -> None:
    state = RequestState("a", list(range(10)), 10, [0], SamplingParams())
    assert not ScheduledRequest(state, 0, 6).samples  # a chunk of the prompt
    assert ScheduledRequest(state, 6, 4).samples  # the prompt's last chunk
    assert not ScheduledRequest(state, 10, 0).samples  # scheduled for nothing
    assert ScheduledRequest(state, 6, 4).seq_len == 10
