"""POST /v1/completions: raw prompts (text, token ids, or a batch of either)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from pagedserve.services.gateway.context import GatewayContext, gateway_context
from pagedserve.services.gateway.errors import invalid_request
from pagedserve.services.gateway.generation import ChoiceDelta, ChoiceResult, Generation
from pagedserve.services.gateway.generation_response import respond
from pagedserve.services.gateway.logprobs import completion_logprobs
from pagedserve.services.gateway.prompt_logprobs import echo_logprobs, joined, vllm_prompt_logprobs
from pagedserve.services.gateway.openai_protocol import Completion, CompletionChoice, CompletionChunk, CompletionRequest, Usage
from pagedserve.services.gateway.request_body import read_json_body
from pagedserve.services.gateway.response_format import structured_output
from pagedserve.services.gateway.sampling import (
    build_sampling_params,
    check_fits_context,
    check_num_choices,
    check_priority,
    check_prompt_bytes,
    check_token_ids,
    request_timeout_s,
    stop_strings,
)
from pagedserve.services.gateway.streaming import sse_event
from pagedserve.shared.tokenizer import encode_prompt

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
        max_model_len = await context.max_model_len()
        for text in texts:
            check_prompt_bytes(len(text.encode("utf-8")), max_model_len, context.max_token_bytes, "prompt")
        tokenizer = context.tokenizer
        prompts = await anyio.to_thread.run_sync(lambda: [encode_prompt(tokenizer, text) for text in texts])
    else:
        for token_ids in prompts:
            check_token_ids(token_ids, context.vocab_size, "prompt")
    if not prompts or any(not token_ids for token_ids in prompts):
        raise invalid_request("prompt must not be empty", "prompt")
    return prompts


class CompletionFormat:
    """Chunks and bodies of /v1/completions. With `echo` each choice's first chunk (or its
    whole body) starts with its prompt: text, and with logprobs the prompt's logprobs
    (`prompt_logprobs.py`); `echo_only` (max_tokens 0) drops the one token generated to
    get them. With `prompt_logprobs` (vLLM's), the choice's first chunk carries them."""

    def __init__(
        self,
        context: GatewayContext,
        completion_id: str,
        generation: Generation,
        logprobs: int | None,
        echo: Echo | None = None,
        prompt_logprobs: int | None = None,
    ) -> None:
        self._context = context
        self._id = completion_id
        self._created = int(time.time())
        self._generation = generation
        self._logprobs = logprobs
        self._echo = echo
        self._prompt_logprobs = prompt_logprobs
        self._text_offsets = [0] * generation.num_choices  # per choice, across chunks
        self._started = [False] * generation.num_choices

    def _choice(self, index: int, text: str, token_ids: list[int], logprobs: list, finish_reason: str | None) -> CompletionChoice:
        echo = self._echo
        if echo is not None and echo.only:
            text, token_ids, logprobs = "", [], []
        formatted = None
        if self._logprobs is not None:
            formatted, self._text_offsets[index] = completion_logprobs(
                self._context.token_texts, token_ids, logprobs, self._text_offsets[index]
            )
        choice = CompletionChoice(index, text, formatted, finish_reason)
        if not self._started[index]:
            self._started[index] = True
            self._start(choice, formatted is not None)
        return choice

    def _start(self, choice: CompletionChoice, with_logprobs: bool) -> None:
        """Put the prompt's part into a choice's first chunk."""
        prompt_index = choice.index // self._generation.num_samples
        prompt_ids = self._generation.prompts[prompt_index]
        entries = self._generation.prompt_logprobs.get(prompt_index, [])
        texts = self._context.token_texts
        if self._prompt_logprobs is not None:
            choice.prompt_logprobs = vllm_prompt_logprobs(texts, prompt_ids, entries, self._prompt_logprobs)
        if self._echo is None:
            return
        prompt_text = self._echo.prompt_texts[prompt_index]
        choice.text = prompt_text + choice.text
        if with_logprobs and choice.logprobs is not None:
            prompt_part, _ = echo_logprobs(texts, prompt_ids, entries, self._logprobs or 0)
            # The completion's offsets continue after the prompt's text.
            shift = len(prompt_text)
            choice.logprobs.text_offset = [offset + shift for offset in choice.logprobs.text_offset]
            self._text_offsets[choice.index] += shift
            choice.logprobs = joined(prompt_part, choice.logprobs)

    def _usage(self, usage: Usage) -> Usage:
        if self._echo is None or not self._echo.only:
            return usage
        # The token generated to get the prompt's logprobs is not returned, nor counted.
        return Usage(usage.prompt_tokens, 0, usage.prompt_tokens, usage.prompt_tokens_details)

    def stream_start(self) -> list[bytes]:
        return []

    def stream_chunk(self, deltas: list[ChoiceDelta]) -> bytes | None:
        choices = [
            self._choice(d.index, d.text, d.token_ids, d.logprobs, d.finish_reason)
            for d in deltas
            if d.text or d.finish_reason is not None or (self._logprobs is not None and d.token_ids) or not self._started[d.index]
        ]
        if not choices:
            return None
        return sse_event(_encoder.encode(CompletionChunk(self._id, "text_completion", self._created, self._context.model_name, choices)))

    def stream_usage(self, usage: Usage) -> bytes:
        chunk = CompletionChunk(self._id, "text_completion", self._created, self._context.model_name, [], self._usage(usage))
        return sse_event(_encoder.encode(chunk))

    def whole(self, results: list[ChoiceResult], usage: Usage) -> bytes:
        choices = [self._choice(r.index, r.text, r.token_ids, r.logprobs, r.finish_reason) for r in results]
        return _encoder.encode(Completion(self._id, "text_completion", self._created, self._context.model_name, choices, self._usage(usage)))


@dataclass
class Echo:
    prompt_texts: list[str]  # by prompt index: the prompt as sent, or decoded from its token ids
    only: bool  # max_tokens 0: the prompt alone


async def create_completion(request: Request) -> Response:
    context = gateway_context(request)
    body = await read_json_body(
        request, CompletionRequest, max_body_bytes=context.config.max_body_bytes, timeout_s=context.config.body_timeout_s
    )
    context.check_model(body.model)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    # echo with max_tokens 0 (as vLLM): generate one token for the prompt's logprobs, drop it.
    echo_only = body.echo and max_tokens == 0
    max_tokens = 1 if echo_only else max_tokens
    # Echo with logprobs needs the prompt's logprobs, as many alternatives as `logprobs`.
    wanted = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
    params = build_sampling_params(
        context, body, max_tokens=max_tokens, logprobs=body.logprobs, prompt_logprobs=max(wanted) if wanted else None
    )
    grammar = await structured_output(context.grammar_validator, body)
    if grammar is not None:
        params = msgspec.structs.replace(params, structured_output=grammar)
    timeout_s = request_timeout_s(body, context.config.request_timeout_s)
    check_priority(body.priority, context.config.scheduling_policy)
    stop = stop_strings(body, context.config.max_stop_strings)
    # Counted before tokenizing: a batch of 100,000 prompts is refused, not tokenized first.
    num_prompts = 1 if isinstance(body.prompt, str) or all(isinstance(item, int) for item in body.prompt) else len(body.prompt)
    check_num_choices(max(num_prompts, 1), body.n, context.config.max_n)
    prompts = await _tokenize_prompts(context, body.prompt)
    max_model_len = await context.max_model_len()
    for token_ids in prompts:
        check_fits_context(len(token_ids), max_model_len, "prompt")

    completion_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(context, completion_id, prompts, params, body.n, stop, body.priority, timeout_s, body.cache_salt)
    echo = None
    if body.echo:
        texts = [body.prompt] if isinstance(body.prompt, str) else [item for item in body.prompt if isinstance(item, str)]
        if len(texts) != len(prompts):  # token-id prompts: their decoded text
            texts = [context.tokenizer.decode(token_ids) for token_ids in prompts]
        echo = Echo(texts, echo_only)
    response_format = CompletionFormat(context, completion_id, generation, body.logprobs, echo, body.prompt_logprobs)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await respond(request, generation, response_format, stream=body.stream, include_usage=include_usage)
