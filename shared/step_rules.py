"""Rules of a step that the scheduler and the executor each compute on their side of the
wire, so that they agree without sending the answer: one function per rule, here, both
sides import it. Torch-free (the scheduler never imports torch).

A sample's sampling params are the other such rule: `SamplingParams.for_sample`.
"""

from __future__ import annotations


def samples_this_step(num_computed_tokens: int, num_scheduled_tokens: int, num_tokens: int) -> bool:
    """Whether a sequence samples a token in a step: when the tokens scheduled for it reach
    the end of the tokens it knows (prompt + output so far). A chunk in the middle of a
    prompt samples nothing, and neither does a sequence scheduled for no token.

    The executor samples exactly these (and only these) sequences; the scheduler expects a
    token from exactly these, and forks an `n > 1` request's samples when it samples its
    first one."""
    return num_scheduled_tokens > 0 and num_computed_tokens + num_scheduled_tokens == num_tokens
