"""GET /openapi.json: the gateway's HTTP API as an OpenAPI 3.1 document.

The schemas are generated from the very msgspec Structs that decode request bodies and
encode responses, so the document cannot drift from what the server accepts: every bound
(`maximum` on max_tokens, `exclusiveMinimum` on timeout, ...) and the refusal of unknown
fields (`additionalProperties: false`) come from the types. Limits that depend on the
deployment (max n, the context length, the body size) are in the operations' text.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.config import GatewayConfig
from services.gateway.errors import ErrorBody
from services.gateway.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ModelList,
)

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


def _generation_operation(summary: str, request: type, whole: type, chunk: type, config: GatewayConfig) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": (
            f"At most {config.max_n} choices per request (prompts x n), a body of at most {config.max_body_bytes:,} "
            f"bytes, a deadline of at most {config.request_timeout_s:g} s (`timeout`, an extension). Unknown fields are "
            "refused (400, code `unknown_parameter`). With `stream: true` the response is Server-Sent Events, one "
            "chunk per `data:` line, ending with `data: [DONE]`."
        ),
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {
                "description": "the completion, or its stream of chunks",
                "content": {"application/json": {"schema": _ref(whole)}, "text/event-stream": {"schema": _ref(chunk)}},
            },
            **_error_responses(400, 401, 404, 413, 415, 429, 503, 504),
        },
    }


def openapi_document(config: GatewayConfig) -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(
        [CompletionRequest, ChatCompletionRequest, Completion, CompletionChunk, ChatCompletion, ChatCompletionChunk, ModelList, ErrorBody],
        ref_template=_REF,
    )
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
        "/health": {"get": {"summary": "200 when a scheduler answers and has a live executor, else 503", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
    }
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        for operation in paths[path].values():
            operation["security"] = security
    return {
        "openapi": "3.1.0",
        "info": {"title": "pagedserve gateway (OpenAI-compatible)", "version": api_version},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def openapi_route(config: GatewayConfig) -> Any:
    """The handler, with the document encoded once (it depends only on the config)."""
    body = msgspec.json.encode(openapi_document(config))

    async def openapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return openapi_json
