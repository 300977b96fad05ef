"""POST /v1/chat/completions: messages through the model's chat template."""

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
from services.gateway.logprobs import chat_logprobs
from services.gateway.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    Usage,
)
from services.gateway.request_body import read_json_body
from services.gateway.sampling import build_sampling_params, check_fits_context, check_num_choices, request_timeout_s, stop_strings
from services.gateway.streaming import sse_event
from shared.tokenizer import encode_chat

_encoder = msgspec.json.Encoder()


def _template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The plain {role, content} dicts chat templates expect. Only text is supported:
    this server runs text-only models."""
    if not messages:
        raise invalid_request("messages must hold at least one message", "messages")
    plain = []
    for i, message in enumerate(messages):
        if message.content is None or isinstance(message.content, str):
            content = message.content or ""
        else:
            parts = []
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise invalid_request(f"content part of type '{part.type}' is not supported (text only)", f"messages[{i}].content[{j}]")
                parts.append(part.text)
            content = "".join(parts)
        role = "system" if message.role == "developer" else message.role
        plain.append({"role": role, "content": content})
    return plain


async def _tokenize_messages(context: GatewayContext, messages: list[ChatMessage]) -> list[int]:
    plain = _template_messages(messages)
    tokenizer = context.tokenizer
    try:
        # Off the event loop: templating and tokenizing a long conversation takes milliseconds.
        return await anyio.to_thread.run_sync(lambda: encode_chat(tokenizer, plain))
    except Exception as error:  # jinja's TemplateError and friends: the template refused these messages
        raise invalid_request(f"the model's chat template rejected the messages: {error}", "messages") from None


class ChatFormat:
    def __init__(self, context: GatewayContext, completion_id: str, num_choices: int, logprobs: bool) -> None:
        self._context = context
        self._id = completion_id
        self._created = int(time.time())
        self._num_choices = num_choices
        self._logprobs = logprobs

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(self._id, "chat.completion.chunk", self._created, self._context.model_name, choices, usage)
        return sse_event(_encoder.encode(chunk))

    def _logprobs_of(self, token_ids: list[int], logprobs: list) -> ChatLogprobs | None:
        if not self._logprobs:
            return None
        return ChatLogprobs(chat_logprobs(self._context.token_texts, token_ids, logprobs))

    def stream_start(self) -> list[bytes]:
        return [self._chunk([ChatChunkChoice(i, ChatDelta(role="assistant", content=""), None, None)]) for i in range(self._num_choices)]

    def stream_chunk(self, deltas: list[ChoiceDelta]) -> bytes | None:
        choices = [
            ChatChunkChoice(d.index, ChatDelta(content=d.text or None), self._logprobs_of(d.token_ids, d.logprobs), d.finish_reason)
            for d in deltas
            if d.text or d.finish_reason is not None or (self._logprobs and d.token_ids)
        ]
        return self._chunk(choices) if choices else None

    def stream_usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def whole(self, results: list[ChoiceResult], usage: Usage) -> bytes:
        choices = [
            ChatChoice(r.index, AssistantMessage("assistant", r.text), self._logprobs_of(r.token_ids, r.logprobs), r.finish_reason)
            for r in results
        ]
        return _encoder.encode(ChatCompletion(self._id, "chat.completion", self._created, self._context.model_name, choices, usage))


async def create_chat_completion(request: Request) -> Response:
    context = gateway_context(request)
    body = await read_json_body(
        request, ChatCompletionRequest, max_body_bytes=context.config.max_body_bytes, timeout_s=context.config.body_timeout_s
    )
    context.check_model(body.model)
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise invalid_request("top_logprobs needs logprobs to be true", "top_logprobs")
        if body.top_logprobs > context.config.max_logprobs:
            raise invalid_request(f"top_logprobs must be in [0, {context.config.max_logprobs}], got {body.top_logprobs}", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    check_num_choices(1, body.n, context.config.max_n)
    timeout_s = request_timeout_s(body, context.config.request_timeout_s)
    stop = stop_strings(body, context.config.max_stop_strings)
    prompt = await _tokenize_messages(context, body.messages)
    max_model_len = await context.max_model_len()

    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    elif body.max_tokens is not None:
        max_tokens, param = body.max_tokens, "max_tokens"
    else:
        # OpenAI's chat default: whatever room the context leaves.
        max_tokens, param = max_model_len - len(prompt), "messages"
        if max_tokens < 1:
            raise invalid_request(
                f"This model's maximum context length is {max_model_len} tokens, but the messages take {len(prompt)}, "
                "leaving no room for a reply", "messages", code="context_length_exceeded",
            )
    if max_tokens < 1:
        raise invalid_request(f"{param} must be at least 1, got {max_tokens}", param)
    params = build_sampling_params(context, body, max_tokens=max_tokens, logprobs=logprobs)
    check_fits_context(len(prompt), max_tokens, max_model_len, param)

    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation(context, completion_id, [prompt], params, body.n, stop, body.priority, timeout_s)
    response_format = ChatFormat(context, completion_id, generation.num_choices, logprobs is not None)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await respond(request, generation, response_format, stream=body.stream, include_usage=include_usage)
