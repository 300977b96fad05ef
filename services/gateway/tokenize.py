"""POST /tokenize and POST /detokenize, in vLLM's shapes, behind the API key like /v1/*.

/tokenize takes either a raw prompt ({model?, prompt, add_special_tokens = true}) or a
conversation ({model?, messages, add_generation_prompt = true, add_special_tokens =
false}, rendered through the same chat template as /v1/chat/completions) and answers
{count, max_model_len, tokens} (and `token_strs` when `return_token_strs`).
/detokenize takes {model?, tokens} and answers {prompt}. Clients use them to count tokens
against the context length before sending a request.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from pagedserve.services.gateway.chat_completions import _template_messages
from pagedserve.services.gateway.chat_template import NO_CHAT_TEMPLATE, has_chat_template
from pagedserve.services.gateway.context import GatewayContext, gateway_context
from pagedserve.services.gateway.errors import invalid_request
from pagedserve.services.gateway.openai_protocol import ChatMessage, TokenId
from pagedserve.services.gateway.request_body import read_json_body
from pagedserve.services.gateway.sampling import check_token_ids

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Exactly one of `prompt` and `messages` (the schema says so with a oneOf)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # messages only
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    return_token_strs: bool = False


class TokenizeResponse(msgspec.Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    tokens: Annotated[list[TokenId], Meta(max_length=MAX_DETOKENIZE_TOKENS)]


class DetokenizeResponse(msgspec.Struct):
    prompt: str


def _encode(context: GatewayContext, body: TokenizeRequest) -> list[int]:
    tokenizer = context.tokenizer
    if body.messages is not None:
        if not has_chat_template(tokenizer):
            raise invalid_request(NO_CHAT_TEMPLATE, "messages")
        plain = _template_messages(body.messages)
        try:
            encoded = tokenizer.apply_chat_template(
                plain, add_generation_prompt=body.add_generation_prompt, tokenize=False
            )
        except Exception as error:  # jinja's TemplateError and friends
            raise invalid_request(f"the model's chat template rejected the messages: {error}", "messages") from None
        # The template already holds its special tokens; vLLM adds none by default.
        return list(tokenizer(encoded, add_special_tokens=bool(body.add_special_tokens)).input_ids)
    assert body.prompt is not None
    add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
    return list(tokenizer(body.prompt, add_special_tokens=add_special_tokens).input_ids)


async def tokenize(request: Request) -> Response:
    context = gateway_context(request)
    body = await read_json_body(
        request, TokenizeRequest, max_body_bytes=context.config.max_body_bytes, timeout_s=context.config.body_timeout_s
    )
    context.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid_request("give exactly one of `prompt` (a string) or `messages` (a conversation)", "prompt")
    tokens = await anyio.to_thread.run_sync(lambda: _encode(context, body))
    max_model_len = await context.max_model_len()
    token_strs = [context.token_texts.get(token_id)[0] for token_id in tokens] if body.return_token_strs else None
    answer = TokenizeResponse(len(tokens), max_model_len, tokens, token_strs)
    return Response(msgspec.json.encode(answer), media_type="application/json")


async def detokenize(request: Request) -> Response:
    context = gateway_context(request)
    body = await read_json_body(
        request, DetokenizeRequest, max_body_bytes=context.config.max_body_bytes, timeout_s=context.config.body_timeout_s
    )
    context.check_model(body.model)
    check_token_ids(body.tokens, context.vocab_size, "tokens")
    tokenizer = context.tokenizer
    text = await anyio.to_thread.run_sync(lambda: tokenizer.decode(body.tokens))
    return Response(msgspec.json.encode(DetokenizeResponse(text)), media_type="application/json")
