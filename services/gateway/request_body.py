"""Reading a JSON request body into a typed Struct, with every way it can be wrong a 400
(or a 413) that says what was wrong and where."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request

from services.gateway.errors import GatewayError, invalid_request

T = TypeVar("T")

# msgspec names the offending field either as a path ("- at `$.messages[0].role`") or,
# for unknown/missing fields, in backquotes; OpenAI's `param` wants the field name.
_PATH = re.compile(r"- at `\$\.?([^`]*)`")
_FIELD = re.compile(r"(?:unknown|required) field `([^`]+)`")


def _param_of(error: msgspec.ValidationError) -> str | None:
    text = str(error)
    field = _FIELD.search(text)
    path = _PATH.search(text)
    if field and path and path.group(1):
        return f"{path.group(1)}.{field.group(1)}"
    if field:
        return field.group(1)
    if path and path.group(1):
        return path.group(1)
    return None


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The raw body, refused early (413) when it announces or grows beyond the limit, so a
    huge upload is never held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request(f"invalid Content-Length header: {declared!r}")
        if int(declared) > max_body_bytes:
            raise GatewayError(413, f"request body of {int(declared):,} bytes exceeds the limit of {max_body_bytes:,} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise GatewayError(413, f"request body exceeds the limit of {max_body_bytes:,} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; a 400 keeps it out of the unexpected-error log.
        raise invalid_request("client disconnected while sending the request body") from None
    return b"".join(chunks)


async def read_json_body(request: Request, body_type: type[T], max_body_bytes: int) -> T:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise invalid_request(f"Content-Type must be application/json, got {content_type or 'none'!r}")
    body = await read_body(request, max_body_bytes)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise invalid_request(f"request body is not valid UTF-8 (byte {error.start})") from None
    if not body.strip():
        raise invalid_request("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=body_type)
    except msgspec.ValidationError as error:
        raise invalid_request(f"invalid request: {error}", param=_param_of(error)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise invalid_request(f"request body is not valid JSON: {error}") from None
