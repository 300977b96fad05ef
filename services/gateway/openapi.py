"""GET /openapi.json: the gateway's HTTP API as an OpenAPI 3.1 document.

The schemas are generated from the very msgspec Structs that decode request bodies and
encode responses, so the document cannot drift from what the server accepts: the types'
bounds (`maximum` on max_tokens, `exclusiveMinimum` on timeout, ...) and the refusal of
unknown fields (`additionalProperties: false`) come from them, the sampling parameters'
value bounds from the table SamplingParams.validate enforces (shared/sampling_bounds.py).
Limits that depend on the deployment (max n, the context length, the body size) are
added on top and named in the operations' text.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from pagedserve.services.gateway.config import GatewayConfig
from pagedserve.services.gateway.context import gateway_context
from pagedserve.services.gateway.errors import ErrorBody
from pagedserve.services.gateway.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ModelList,
)
from pagedserve.services.gateway.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from pagedserve.shared.sampling_bounds import MAX_BEAM_WIDTH, Bound, sampling_bounds

_REF = "#/components/schemas/{name}"


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=struct.__name__)}


def _error_responses(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "invalid request (a field's type or value, malformed JSON, context length exceeded)",
        401: "missing or incorrect API key",
        404: "unknown model",
        413: "request body over the size limit",
        415: "Content-Type is not application/json",
        429: "the scheduler's waiting queue is full (see Retry-After)",
        503: "no scheduler or no live executor",
        504: "the request's deadline passed before any token was generated",
    }
    body = {"application/json": {"schema": _ref(ErrorBody)}}
    return {str(status): {"description": reasons[status], "content": body} for status in statuses}


def _sse_event(chunk: type) -> dict[str, Any]:
    """One Server-Sent Event of a stream (OpenAPI 3.1: `schema` describes each event): its
    `data` is a chunk, an error that ended the stream, or the final `[DONE]`."""
    json_data = {
        "type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorBody)]},
    }
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def _generation_operation(summary: str, request: type, whole: type, chunk: type, config: GatewayConfig) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": (
            f"At most {config.max_n} choices per request (prompts x n), a body of at most {config.max_body_bytes:,} "
            f"bytes, a deadline of at most {config.request_timeout_s:g} s (`timeout`, an extension). Unknown fields are "
            "refused (400, code `unknown_parameter`). With `stream: true` the response is Server-Sent Events, one "
            "chunk per `data:` line, ending with `data: [DONE]`; a failure after the stream started is an `{\"error\": ...}` event before it."
        ),
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {
                "description": "the completion, or its stream of chunks",
                "content": {"application/json": {"schema": _ref(whole)}, "text/event-stream": {"schema": _sse_event(chunk)}},
            },
            **_error_responses(400, 401, 404, 413, 415, 429, 503, 504),
        },
    }


def _bound(schema: dict[str, Any], field: str, description: str | None = None, **bounds: Any) -> None:
    """Tighten a property's number (or array) option, keeping its null option."""
    prop = schema["properties"][field]
    for option in prop.get("anyOf", [prop]):
        if option.get("type") in ("integer", "number", "array"):
            option.update(bounds)
    if description is not None:
        prop["description"] = description


def _absent_or(value: Any) -> dict[str, Any]:
    """A property that is left out, null, or equal to `value` (the default)."""
    return {"anyOf": [{"type": "null"}, {"const": value}]}


def _state_sampling_bounds(schema: dict[str, Any], bounds: tuple[Bound, ...]) -> None:
    """The table's bounds (shared/sampling_bounds.py, what SamplingParams.validate
    enforces) on a request's number fields of those names. A mapping's bound
    (logit_bias) is already in its request type, which takes it from the same table."""
    for bound in bounds:
        for name in (bound.field, *bound.aliases):
            prop = schema["properties"].get(name)
            if prop is None or bound.each_value or not any(
                option.get("type") in ("integer", "number") for option in prop.get("anyOf", [prop])
            ):
                continue  # not in this request, or another type there (chat's logprobs: a bool)
            _bound(schema, name, bound.note or None, **bound.json_schema())


def _state_server_bounds(schemas: dict[str, Any], config: GatewayConfig) -> None:
    """The value ranges SamplingParams.validate and the endpoints enforce (some set by
    this deployment's config), and the rules that span fields as if/then clauses: the
    document refuses what the server refuses. What no schema can say (a prompt's tokens
    plus max_tokens within the context length; prompts x n within max_n) is in the
    descriptions."""
    max_beam_width = min(MAX_BEAM_WIDTH, config.max_n)
    bounds = sampling_bounds(config.max_logprobs)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        schema = schemas[name]
        _state_sampling_bounds(schema, bounds)
        # This deployment's limits, tighter than the table's.
        _bound(schema, "n", f"choices per prompt; prompts x n at most {config.max_n}", maximum=config.max_n)
        _bound(schema, "beam_width", f"beam search over this many beams (at most {max_beam_width}); n at most beam_width", maximum=max_beam_width)
        _bound(schema, "stop", maxItems=config.max_stop_strings)
        _bound(schema, "timeout", f"seconds, at most {config.request_timeout_s:g} (the server's limit)", maximum=config.request_timeout_s)
        _bound(schema, "min_tokens", "EOS and stop_token_ids are held back until this many tokens (max_tokens still ends the completion)")
        _bound(
            schema, "logit_bias",
            "token id (a string of digits, below the vocabulary size) -> bias in [-100, 100], added to its logit",
        )
        schema["properties"]["stream_options"]["description"] = "only with stream: true"
        rules: list[dict[str, Any]] = [
            # stream_options only when streaming.
            {"if": _present("stream_options", {"type": "object"}), "then": _required("stream", {"const": True})},
            # Beam search: deterministic, n at most beam_width, none of the per-token knobs.
            {
                "if": _present("beam_width", {"type": "integer", "minimum": 2}),
                "then": {"properties": {
                    "presence_penalty": _absent_or(0), "frequency_penalty": _absent_or(0), "repetition_penalty": _absent_or(1),
                    "logit_bias": {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]},
                    "min_tokens": _absent_or(0),
                    **{field: {"type": "null"} for field in ("prompt_logprobs", "response_format", "structured_outputs", "guided_json",
                                                              "guided_regex", "guided_choice", "guided_grammar") if field in schema["properties"]},
                }},
            },
        ]
        schema["allOf"] = rules
    completion, chat = schemas["CompletionRequest"], schemas["ChatCompletionRequest"]
    _bound(completion, "logprobs", f"at most {config.max_logprobs}; not with beam search")
    _bound(completion, "prompt_logprobs", f"at most {config.max_logprobs}; not with beam search")
    _bound(chat, "top_logprobs", f"at most {config.max_logprobs}; only with logprobs: true")
    # The one exception to the table: a completion of the prompt alone (echo) asks for 0.
    _bound(completion, "max_tokens", "at least 1; 0 only with echo: true (the prompt alone)", minimum=0)
    completion["allOf"] += [
        {"if": _present("max_tokens", {"const": 0}), "then": _required("echo", {"const": True})},
        {"if": _present("beam_width", {"type": "integer", "minimum": 2}), "then": {"properties": {"logprobs": {"type": "null"}}}},
    ]
    _bound(chat, "prompt_logprobs", f"at most {config.max_logprobs}; not with beam search")
    function = schemas["FunctionDefinition"]["properties"]
    function["parameters"] = {
        "anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"const": "object"}}}],
        "description": "a JSON schema of the arguments, of type object",
    }
    chat["properties"]["tool_choice"]["description"] = "only with tools; a named function must be one of them, declared once"
    chat["allOf"] += [
        {
            "if": _present("tool_choice", {"not": {"anyOf": [{"type": "null"}, {"const": "none"}]}}),
            "then": _required("tools", {"type": "array", "minItems": 1}),
        },
        {"if": _present("top_logprobs", {"type": "integer"}), "then": _required("logprobs", {"const": True})},
        {"if": _present("beam_width", {"type": "integer", "minimum": 2}), "then": {"properties": {"logprobs": {"const": False}}}},
    ]


def _state_non_empty(schemas: dict[str, Any]) -> None:
    """Prompts and conversations must hold something (the endpoints refuse empty ones)."""
    for name in ("ChatCompletionRequest", "TokenizeRequest"):
        _bound(schemas[name], "messages", minItems=1)
    # The completion prompt's shapes: `_state_model_bounds`.
    tokenize_prompt = schemas["TokenizeRequest"]["properties"]["prompt"]
    for option in tokenize_prompt.get("anyOf", [tokenize_prompt]):
        if option.get("type") == "string":
            option["minLength"] = 1


def _integers_below(limit: int) -> str:
    """A regex for the decimal integers 0..limit-1 without leading zeros: how a
    `logit_bias` key (a JSON object key, so a string) names a token id."""
    top = str(limit - 1)
    width = len(top)
    options = ["[0-9]"] if width > 1 else [f"[0-{top}]"]
    if width > 2:
        options.append(f"[1-9][0-9]{{1,{width - 2}}}")
    if width > 1:
        for i, digit in enumerate(top):
            low = 1 if i == 0 else 0
            if int(digit) > low:
                rest = width - i - 1
                options.append(top[:i] + f"[{low}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
        options.append(top)
    return "^(?:" + "|".join(options) + ")$"


def _state_model_bounds(schemas: dict[str, Any], config: GatewayConfig, vocab_size: int, max_model_len: int | None) -> None:
    """What the served model bounds: token ids below its vocabulary size, a token-id
    prompt shorter than its context (one token must fit after it), and the prompt's
    shapes (a string, strings, token ids, lists of token ids: never a mixture). The text
    prompts' and conversations' token counts cannot be stated; the descriptions say the
    rule."""
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    token_ids: dict[str, Any] = {"type": "array", "items": token_id, "minItems": 1}
    if max_model_len is not None:
        token_ids["maxItems"] = max_model_len - 1
    context = f"{max_model_len:,} tokens" if max_model_len is not None else "the model's context length"
    completion, chat = schemas["CompletionRequest"], schemas["ChatCompletionRequest"]
    completion["properties"]["prompt"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1},
        ],
        "description": (
            f"a string, a list of token ids (below {vocab_size:,}), or a batch of either (not a mixture); each prompt "
            f"must leave room in the context ({context}) for one generated token"
        ),
    }
    # prompts x n <= max_n is in `n`'s description: one if/then clause per n would state it,
    # but schemathesis's generator gives up on a schema with that many clauses.
    chat["properties"]["messages"]["description"] = f"the conversation; once templated it must leave room in the context ({context}) for one generated token"
    for schema in (completion, chat):
        _bound(schema, "max_tokens", f"{schema['properties']['max_tokens'].get('description', 'at least 1')}; the completion also ends where the context ({context}) does, finish_reason length")
        stop_ids = schema["properties"]["stop_token_ids"]
        for option in stop_ids["anyOf"]:
            if option.get("type") == "array":
                option["items"] = token_id
        for option in schema["properties"]["logit_bias"]["anyOf"]:
            if option.get("type") == "object":
                option["propertyNames"] = {"pattern": _integers_below(vocab_size)}
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] = token_id


def _present(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": [field], "properties": {field: schema}}


_required = _present


def _plain_operation(summary: str, request: type, response: type) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "the answer", "content": {"application/json": {"schema": _ref(response)}}},
            **_error_responses(400, 401, 404, 413, 415, 503),
        },
    }


def openapi_document(config: GatewayConfig, vocab_size: int = 2**31, max_model_len: int | None = None) -> dict[str, Any]:
    """The document for a model of `vocab_size` token ids and a context of `max_model_len`
    tokens (None: not known yet, so not stated)."""
    _, schemas = msgspec.json.schema_components(
        [CompletionRequest, ChatCompletionRequest, Completion, CompletionChunk, ChatCompletion, ChatCompletionChunk, ModelList, ErrorBody,
         TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse],
        ref_template=_REF,
    )
    _state_server_bounds(schemas, config)
    _state_non_empty(schemas)
    _state_model_bounds(schemas, config, vocab_size, max_model_len)
    schemas["ResponseFormat"]["allOf"] = [
        {"if": _present("type", {"const": "json_schema"}), "then": _required("json_schema", {"type": "object"})},
    ]
    # Exactly one of a prompt and a conversation.
    schemas["TokenizeRequest"]["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
    ]
    try:
        api_version = version("pagedserve")
    except PackageNotFoundError:
        api_version = "0"
    security = [{"bearer": []}] if config.api_key is not None else []
    paths: dict[str, Any] = {
        "/v1/completions": {"post": _generation_operation("Complete raw prompts", CompletionRequest, Completion, CompletionChunk, config)},
        "/v1/chat/completions": {
            "post": _generation_operation("Complete a conversation", ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, config)
        },
        "/v1/models": {
            "get": {
                "summary": "The served model",
                "responses": {"200": {"description": "one model", "content": {"application/json": {"schema": _ref(ModelList)}}}, **_error_responses(401)},
            }
        },
        "/tokenize": {"post": _plain_operation("Tokenize a prompt or a conversation (vLLM's shape)", TokenizeRequest, TokenizeResponse)},
        "/detokenize": {"post": _plain_operation("Token ids back to text (vLLM's shape)", DetokenizeRequest, DetokenizeResponse)},
        "/health": {"get": {"summary": "200 when a scheduler answers and has a live executor, else 503", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
    }
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"):
        for operation in paths[path].values():
            operation["security"] = security
    return {
        "openapi": "3.1.0",
        "info": {"title": "pagedserve gateway (OpenAI-compatible)", "version": api_version},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def openapi_route(config: GatewayConfig) -> Any:
    """The handler. The document states the served model's vocabulary size and context
    length, learned from the replicas; it is encoded once per pair."""
    bodies: dict[tuple[int, int | None], bytes] = {}

    async def openapi_json(request: Request) -> Response:
        context = gateway_context(request)
        info = context.replicas.first_info()
        key = (context.vocab_size, info.max_model_len if info is not None and info.max_model_len > 0 else None)
        if key not in bodies:
            bodies[key] = msgspec.json.encode(openapi_document(config, *key))
        return Response(bodies[key], media_type="application/json")

    return openapi_json
