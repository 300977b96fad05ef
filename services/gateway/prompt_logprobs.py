"""A prompt's logprobs in the two shapes `/v1/completions` returns them: the legacy
`logprobs` lists that `echo` prepends to the completion's (what lm-evaluation-harness's
loglikelihood requests read), and vLLM's `prompt_logprobs` (one {token id: {logprob,
rank, decoded_token}} dict per prompt token). Both put null at the first prompt token:
nothing precedes it, so the model gives it no probability.

The scheduler sends the entries for tokens 1..P-1 with a request's first token
(`RequestDelta.prompt_logprobs`).
"""

from __future__ import annotations

from pagedserve.services.gateway.detokenizer import TokenTexts
from pagedserve.services.gateway.openai_protocol import CompletionLogprobs, PromptLogprob
from pagedserve.shared.messages import TokenLogprobs


def echo_logprobs(
    token_texts: TokenTexts, prompt_token_ids: list[int], entries: list[TokenLogprobs], num_top: int
) -> tuple[CompletionLogprobs, int]:
    """The legacy lists for the prompt's tokens (the first one's logprob and alternatives
    null), each alternative dict holding the `num_top` likeliest; and the text offset
    after the prompt, where the completion's offsets continue."""
    tokens: list[str] = []
    offsets: list[int] = []
    text_offset = 0
    for token_id in prompt_token_ids:
        text, _ = token_texts.get(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
    token_logprobs: list[float | None] = [None] + [entry.logprob for entry in entries]
    top: list[dict[str, float] | None] = [None]
    for token_id, entry in zip(prompt_token_ids[1:], entries):
        alternatives = {token_texts.get(t)[0]: lp for t, lp in zip(entry.top_token_ids[:num_top], entry.top_logprobs[:num_top])}
        # OpenAI's legacy format lists the chosen token among the alternatives too.
        alternatives.setdefault(token_texts.get(token_id)[0], entry.logprob)
        top.append(alternatives)
    return CompletionLogprobs(tokens, token_logprobs, top, offsets), text_offset


def vllm_prompt_logprobs(
    token_texts: TokenTexts, prompt_token_ids: list[int], entries: list[TokenLogprobs], num_top: int
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's shape: per prompt token after the first, the token itself (with its rank)
    and the `num_top` likeliest alternatives (ranks 1..num_top)."""
    result: list[dict[str, PromptLogprob] | None] = [None]
    for token_id, entry in zip(prompt_token_ids[1:], entries):
        logprobs = {str(token_id): PromptLogprob(entry.logprob, entry.rank, token_texts.get(token_id)[0])}
        for rank, (top_id, top_logprob) in enumerate(zip(entry.top_token_ids[:num_top], entry.top_logprobs[:num_top]), 1):
            logprobs.setdefault(str(top_id), PromptLogprob(top_logprob, rank, token_texts.get(top_id)[0]))
        result.append(logprobs)
    return result


def joined(first: CompletionLogprobs, second: CompletionLogprobs | None) -> CompletionLogprobs:
    if second is None:
        return first
    return CompletionLogprobs(
        first.tokens + second.tokens,
        first.token_logprobs + second.token_logprobs,
        first.top_logprobs + second.top_logprobs,
        first.text_offset + second.text_offset,
    )
