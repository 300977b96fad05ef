"""POST /v1/chat/completions: messages through the model's chat template."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from pagedserve.services.gateway.chat_template import NO_CHAT_TEMPLATE, encode_chat_with_tools, has_chat_template
from pagedserve.services.gateway.context import GatewayContext, gateway_context
from pagedserve.services.gateway.errors import invalid_request
from pagedserve.services.gateway.generation import ChoiceDelta, ChoiceResult, Generation
from pagedserve.services.gateway.generation_response import respond
from pagedserve.services.gateway.logprobs import chat_logprobs
from pagedserve.services.gateway.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    PromptLogprob,
    Usage,
)
from pagedserve.services.gateway.prompt_logprobs import vllm_prompt_logprobs
from pagedserve.services.gateway.request_body import read_json_body
from pagedserve.services.gateway.response_format import structured_output
from pagedserve.services.gateway.sampling import (
    build_sampling_params,
    check_fits_context,
    check_num_choices,
    check_priority,
    check_prompt_bytes,
    request_timeout_s,
    stop_strings,
)
from pagedserve.services.gateway.streaming import sse_event
from pagedserve.services.gateway.tool_calls import ToolCallStream, ToolPlan, forced_grammar, parse_tool_calls, tool_plan
from pagedserve.shared.tokenizer import encode_chat

_encoder = msgspec.json.Encoder()


def _template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The plain {role, content} dicts chat templates expect (with `tool_calls` on an
    assistant turn that called tools, `tool_call_id` on a tool's result). Only text is
    supported: this server runs text-only models."""
    if not messages:
        raise invalid_request("messages must hold at least one message", "messages")
    plain = []
    for message in messages:
        if message.content is None or isinstance(message.content, str):
            content = message.content or ""
        else:
            content = "".join(part.text for part in message.content)  # text parts only (the type says so)
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": content}
        if message.tool_calls:
            entry["tool_calls"] = [msgspec.to_builtins(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        plain.append(entry)
    return plain


async def _tokenize_messages(context: GatewayContext, messages: list[ChatMessage], plan: ToolPlan | None) -> list[int]:
    plain = _template_messages(messages)
    # Bounded before templating and tokenizing: their time grows with the text.
    text_bytes = sum(len(m["content"].encode("utf-8")) for m in plain)
    check_prompt_bytes(text_bytes, await context.max_model_len(), context.max_token_bytes, "messages")
    tokenizer = context.tokenizer
    tools = [msgspec.to_builtins(tool) for tool in plan.tools] if plan is not None and plan.render_tools else None
    with_tools = tools is not None or any(m.role == "tool" or m.tool_calls for m in messages)
    if not has_chat_template(tokenizer) and not (with_tools and context.tool_template is not None):
        raise invalid_request(NO_CHAT_TEMPLATE, "messages")
    try:
        # Off the event loop: templating and tokenizing a long conversation takes milliseconds.
        if with_tools:
            template = context.tool_template
            return await anyio.to_thread.run_sync(lambda: encode_chat_with_tools(tokenizer, plain, tools, template))
        return await anyio.to_thread.run_sync(lambda: encode_chat(tokenizer, plain))
    except Exception as error:  # jinja's TemplateError and friends: the template refused these messages
        raise invalid_request(f"the model's chat template rejected the messages: {error}", "messages") from None


class ChatFormat:
    def __init__(
        self,
        context: GatewayContext,
        completion_id: str,
        generation: Generation,
        logprobs: bool,
        tool_plan: ToolPlan | None = None,
        prompt_logprobs: int | None = None,
    ) -> None:
        num_choices = generation.num_choices
        # Tool calls are parsed out of each choice's text (tool_calls.py); "none" parses nothing.
        self._tool_plan = tool_plan if tool_plan is not None and tool_plan.mode != "none" else None
        self._tool_streams = [ToolCallStream(self._tool_plan) for _ in range(num_choices)] if self._tool_plan else []
        self._context = context
        self._id = completion_id
        self._created = int(time.time())
        self._num_choices = num_choices
        self._logprobs = logprobs
        self._generation = generation
        # vLLM's prompt_logprobs: response-level (one conversation), sent once.
        self._prompt_logprobs = prompt_logprobs
        self._prompt_logprobs_sent = prompt_logprobs is None

    def _prompt_logprobs_entries(self) -> list[dict[str, PromptLogprob] | None] | None:
        """The prompt's entries, once: they come with the first token (`generation.py`)."""
        if self._prompt_logprobs_sent or 0 not in self._generation.prompt_logprobs:
            return None
        self._prompt_logprobs_sent = True
        entries = self._generation.prompt_logprobs[0]
        return vllm_prompt_logprobs(self._context.token_texts, self._generation.prompts[0], entries, self._prompt_logprobs or 0)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(self._id, "chat.completion.chunk", self._created, self._context.model_name, choices, usage)
        if choices:
            chunk.prompt_logprobs = self._prompt_logprobs_entries()
        return sse_event(_encoder.encode(chunk))

    def _logprobs_of(self, token_ids: list[int], logprobs: list) -> ChatLogprobs | None:
        if not self._logprobs:
            return None
        return ChatLogprobs(chat_logprobs(self._context.token_texts, token_ids, logprobs))

    def stream_start(self) -> list[bytes]:
        return [self._chunk([ChatChunkChoice(i, ChatDelta(role="assistant", content=""), None, None)]) for i in range(self._num_choices)]

    def stream_chunk(self, deltas: list[ChoiceDelta]) -> bytes | None:
        if self._tool_plan is not None:
            return self._tool_stream_chunk(deltas)
        choices = [
            ChatChunkChoice(d.index, ChatDelta(content=d.text or None), self._logprobs_of(d.token_ids, d.logprobs), d.finish_reason)
            for d in deltas
            if d.text or d.finish_reason is not None or (self._logprobs and d.token_ids)
        ]
        return self._chunk(choices) if choices else None

    def _tool_stream_chunk(self, deltas: list[ChoiceDelta]) -> bytes | None:
        choices = []
        for d in deltas:
            stream = self._tool_streams[d.index]
            content, tool_calls = stream.update(d.text, final=d.finish_reason is not None)
            finish_reason = "tool_calls" if d.finish_reason == "stop" and stream.called else d.finish_reason
            if content or tool_calls or finish_reason is not None or (self._logprobs and d.token_ids):
                delta = ChatDelta(content=content or None, tool_calls=tool_calls or None)
                choices.append(ChatChunkChoice(d.index, delta, self._logprobs_of(d.token_ids, d.logprobs), finish_reason))
        return self._chunk(choices) if choices else None

    def _message(self, result: ChoiceResult) -> tuple[AssistantMessage, str]:
        if self._tool_plan is None:
            return AssistantMessage("assistant", result.text), result.finish_reason
        content, calls = parse_tool_calls(self._tool_plan, result.text)
        if not calls:
            return AssistantMessage("assistant", result.text), result.finish_reason
        finish_reason = "tool_calls" if result.finish_reason == "stop" else result.finish_reason
        return AssistantMessage("assistant", content, calls), finish_reason

    def stream_usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def whole(self, results: list[ChoiceResult], usage: Usage) -> bytes:
        choices = []
        for r in results:
            message, finish_reason = self._message(r)
            choices.append(ChatChoice(r.index, message, self._logprobs_of(r.token_ids, r.logprobs), finish_reason))
        completion = ChatCompletion(self._id, "chat.completion", self._created, self._context.model_name, choices, usage)
        completion.prompt_logprobs = self._prompt_logprobs_entries()
        return _encoder.encode(completion)


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
    check_priority(body.priority, context.config.scheduling_policy)
    stop = stop_strings(body, context.config.max_stop_strings)
    plan = tool_plan(body)
    prompt = await _tokenize_messages(context, body.messages, plan)
    max_model_len = await context.max_model_len()

    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    elif body.max_tokens is not None:
        max_tokens, param = body.max_tokens, "max_tokens"
    else:
        # OpenAI's chat default: whatever room the context leaves.
        max_tokens, param = max(max_model_len - len(prompt), 1), "max_tokens"
    if max_tokens < 1:
        raise invalid_request(f"{param} must be at least 1, got {max_tokens}", param)
    check_fits_context(len(prompt), max_model_len, "messages")
    params = build_sampling_params(context, body, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=body.prompt_logprobs)
    # "required" and a named function are forced by a grammar, so the call always parses.
    forced = forced_grammar(plan) if plan is not None else None
    grammar = await structured_output(context.grammar_validator, body, (forced, "tool_choice") if forced else None)
    if grammar is not None:
        params = msgspec.structs.replace(params, structured_output=grammar)

    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation(context, completion_id, [prompt], params, body.n, stop, body.priority, timeout_s, body.cache_salt)
    response_format = ChatFormat(context, completion_id, generation, logprobs is not None, plan, body.prompt_logprobs)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await respond(request, generation, response_format, stream=body.stream, include_usage=include_usage)
