"""POST /v1/completions: raw prompts (text, token ids, or a batch of either)."""

from __future__ import annotations

import time
import uuid

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.context import GatewayContext, gateway_context
from services.gateway.errors import invalid_request
from services.gateway.generation import ChoiceDelta, ChoiceResult, Generation
from services.gateway.generation_response import respond
from services.gateway.logprobs import completion_logprobs
from services.gateway.openai_protocol import Completion, CompletionChoice, CompletionChunk, CompletionRequest, Usage
from services.gateway.request_body import read_json_body
from services.gateway.sampling import build_sampling_params, check_fits_context, check_num_choices, check_token_ids, request_timeout_s, stop_strings
from services.gateway.streaming import sse_event
from shared.tokenizer import encode_prompt

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default

_encoder = msgspec.json.Encoder()


async def _tokenize_prompts(context: GatewayContext, prompt: str | list[str | int | list[int]]) -> list[list[int]]:
    """One token list per prompt. Text is tokenized off the event loop: a long prompt
    takes milliseconds, which every other stream would otherwise wait out."""
    texts: list[str] = []
    prompts: list[list[int]] = []
    if isinstance(prompt, str):
        texts = [prompt]
    elif all(isinstance(item, int) for item in prompt):
        prompts = [[item for item in prompt if isinstance(item, int)]]
    elif all(isinstance(item, str) for item in prompt):
        texts = [item for item in prompt if isinstance(item, str)]
    elif all(isinstance(item, list) for item in prompt):
        prompts = [item for item in prompt if isinstance(item, list)]
    else:
        raise invalid_request("prompt must be a string, a list of token ids, or a list of either, not a mixture", "prompt")
    if texts:
        tokenizer = context.tokenizer
        prompts = await anyio.to_thread.run_sync(lambda: [encode_prompt(tokenizer, text) for text in texts])
    else:
        for token_ids in prompts:
            check_token_ids(token_ids, context.vocab_size, "prompt")
    if not prompts or any(not token_ids for token_ids in prompts):
        raise invalid_request("prompt must not be empty", "prompt")
    return prompts


class CompletionFormat:
    def __init__(self, context: GatewayContext, completion_id: str, num_choices: int, logprobs: bool) -> None:
        self._context = context
        self._id = completion_id
        self._created = int(time.time())
        self._logprobs = logprobs
        self._text_offsets = [0] * num_choices  # per choice, across chunks

    def _choice(self, index: int, text: str, token_ids: list[int], logprobs: list, finish_reason: str | None) -> CompletionChoice:
        formatted = None
        if self._logprobs:
            formatted, self._text_offsets[index] = completion_logprobs(
                self._context.token_texts, token_ids, logprobs, self._text_offsets[index]
            )
        return CompletionChoice(index, text, formatted, finish_reason)

    def stream_start(self) -> list[bytes]:
        return []

    def stream_chunk(self, deltas: list[ChoiceDelta]) -> bytes | None:
        choices = [
            self._choice(d.index, d.text, d.token_ids, d.logprobs, d.finish_reason)
            for d in deltas
            if d.text or d.finish_reason is not None or (self._logprobs and d.token_ids)
        ]
        if not choices:
            return None
        return sse_event(_encoder.encode(CompletionChunk(self._id, "text_completion", self._created, self._context.model_name, choices)))

    def stream_usage(self, usage: Usage) -> bytes:
        chunk = CompletionChunk(self._id, "text_completion", self._created, self._context.model_name, [], usage)
        return sse_event(_encoder.encode(chunk))

    def whole(self, results: list[ChoiceResult], usage: Usage) -> bytes:
        choices = [self._choice(r.index, r.text, r.token_ids, r.logprobs, r.finish_reason) for r in results]
        return _encoder.encode(Completion(self._id, "text_completion", self._created, self._context.model_name, choices, usage))


async def create_completion(request: Request) -> Response:
    context = gateway_context(request)
    body = await read_json_body(
        request, CompletionRequest, max_body_bytes=context.config.max_body_bytes, timeout_s=context.config.body_timeout_s
    )
    context.check_model(body.model)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = build_sampling_params(context, body, max_tokens=max_tokens, logprobs=body.logprobs)
    timeout_s = request_timeout_s(body, context.config.request_timeout_s)
    stop = stop_strings(body, context.config.max_stop_strings)
    # Counted before tokenizing: a batch of 100,000 prompts is refused, not tokenized first.
    num_prompts = 1 if isinstance(body.prompt, str) or all(isinstance(item, int) for item in body.prompt) else len(body.prompt)
    check_num_choices(max(num_prompts, 1), body.n, context.config.max_n)
    prompts = await _tokenize_prompts(context, body.prompt)
    max_model_len = await context.max_model_len()
    for token_ids in prompts:
        check_fits_context(len(token_ids), max_tokens, max_model_len, "max_tokens")

    completion_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(context, completion_id, prompts, params, body.n, stop, body.priority, timeout_s)
    response_format = CompletionFormat(context, completion_id, generation.num_choices, body.logprobs is not None)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await respond(request, generation, response_format, stream=body.stream, include_usage=include_usage)
