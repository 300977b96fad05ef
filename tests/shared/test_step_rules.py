"""shared/step_rules.py: the rules the scheduler and the executor both apply to a step."""

from __future__ import annotations

from pagedserve.shared.step_rules import samples_this_step


def test_a_sequence_samples_when_its_scheduled_tokens_reach_its_last_known_token() -> None:
    assert samples_this_step(num_computed_tokens=0, num_scheduled_tokens=10, num_tokens=10)  # whole prompt
    assert samples_this_step(num_computed_tokens=10, num_scheduled_tokens=1, num_tokens=11)  # a decode
    assert samples_this_step(num_computed_tokens=8, num_scheduled_tokens=2, num_tokens=10)  # last chunk


def test_a_chunk_in_the_middle_of_a_prompt_or_nothing_scheduled_samples_nothing() -> None:
    assert not samples_this_step(num_computed_tokens=0, num_scheduled_tokens=4, num_tokens=10)
    assert not samples_this_step(num_computed_tokens=10, num_scheduled_tokens=0, num_tokens=10)
