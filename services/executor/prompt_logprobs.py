"""Prompt logprobs (vLLM's `prompt_logprobs`, and what `/v1/completions` `echo` with
`logprobs` returns): the logprob of every prompt token given the tokens before it.

Sampling needs the logits of a request's last position only; these need the logits of
every prompt position. They are computed in the same forward, from the hidden states a
prefill chunk produced anyway, and only for requests that ask (nobody else pays the
[tokens, vocab] projection). A chunk covering positions a..b-1 gives the logprobs of
prompt tokens a+1..b; the executor's mirror gathers them over the chunks and the first
sampled token carries them out (`SampledToken.prompt_logprobs`). The scheduler computes
such a request whole (no prefix-cache hits, no swap before its first token), so every
position passes through here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pagedserve.services.executor.request_state import ScheduledRequest
from pagedserve.shared.messages import TokenLogprobs

# Positions projected to the vocabulary at once: 256 x 49,152 float64 logits are 100 MB.
_POSITIONS_PER_CHUNK = 256


def wants_prompt_logprobs(item: ScheduledRequest) -> bool:
    """It asked for them and has sampled nothing yet (a recompute after its first token
    has already reported them)."""
    state = item.state
    return state.sampling_params.prompt_logprobs is not None and len(state.token_ids) == state.num_prompt_tokens


def collect_prompt_logprobs(
    scheduled: Sequence[ScheduledRequest],
    query_end_loc: np.ndarray,
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Append to each asking request's mirror the logprobs of the prompt tokens its
    scheduled positions predict. hidden: [num_tokens, hidden_size] of the flattened batch,
    request i's tokens ending at query_end_loc[i]."""
    for row, item in enumerate(scheduled):
        if not wants_prompt_logprobs(item):
            continue
        state = item.state
        num_top = state.sampling_params.prompt_logprobs or 0
        # Position p predicts token p + 1; the last prompt position predicts the first
        # output token, which the sampler reports.
        end = min(item.seq_len, state.num_prompt_tokens - 1)
        first_row = int(query_end_loc[row]) - item.num_new_tokens - item.num_computed_tokens
        for start in range(item.num_computed_tokens, end, _POSITIONS_PER_CHUNK):
            stop = min(start + _POSITIONS_PER_CHUNK, end)
            logits = compute_logits(hidden[first_row + start : first_row + stop])
            targets = torch.tensor(state.token_ids[start + 1 : stop + 1], device=logits.device)
            state.prompt_logprobs += token_logprobs(logits, targets, num_top)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """For each row of logits [n, vocab]: the logprob and rank of token_ids[row] and the
    num_top likeliest alternatives, from the raw logits (in at least float32)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks: list[int] = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    chosen_list: list[float] = chosen.squeeze(1).tolist()
    if num_top == 0:
        return [TokenLogprobs(lp, rank=rank) for lp, rank in zip(chosen_list, ranks)]
    values, ids = logprobs.topk(num_top, dim=-1)
    return [
        TokenLogprobs(lp, top_ids, top_values, rank)
        for lp, top_ids, top_values, rank in zip(chosen_list, ids.tolist(), values.tolist(), ranks)
    ]
