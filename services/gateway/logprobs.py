"""The scheduler's per-token logprobs in each endpoint's OpenAI format.

Completions use the legacy parallel lists (tokens, token_logprobs, top_logprobs as
{token: logprob} dicts, text_offset); chat uses one object per token with its bytes and
a list of alternatives. Both map onto the same `TokenLogprobs` from the sampler.
"""

from __future__ import annotations

from pagedserve.shared.messages import TokenLogprobs
from pagedserve.services.gateway.detokenizer import TokenTexts
from pagedserve.services.gateway.openai_protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob


def completion_logprobs(
    token_texts: TokenTexts, token_ids: list[int], logprobs: list[TokenLogprobs], text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """The legacy format for these tokens, and the text offset after them (offsets run
    over the whole choice, so a stream passes the previous chunk's end in)."""
    tokens: list[str] = []
    offsets: list[int] = []
    top: list[dict[str, float] | None] = []
    for token_id, token_logprobs in zip(token_ids, logprobs):
        text, _ = token_texts.get(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        top.append({token_texts.get(t)[0]: lp for t, lp in zip(token_logprobs.top_token_ids, token_logprobs.top_logprobs)})
    token_logprobs_list: list[float | None] = [entry.logprob for entry in logprobs[: len(tokens)]]
    return CompletionLogprobs(tokens, token_logprobs_list, top, offsets), text_offset


def chat_logprobs(token_texts: TokenTexts, token_ids: list[int], logprobs: list[TokenLogprobs]) -> list[ChatTokenLogprob]:
    content: list[ChatTokenLogprob] = []
    for token_id, token_logprobs in zip(token_ids, logprobs):
        text, raw = token_texts.get(token_id)
        alternatives = []
        for top_id, top_logprob in zip(token_logprobs.top_token_ids, token_logprobs.top_logprobs):
            top_text, top_raw = token_texts.get(top_id)
            alternatives.append(TopLogprob(top_text, top_logprob, top_raw))
        content.append(ChatTokenLogprob(text, token_logprobs.logprob, raw, alternatives))
    return content

