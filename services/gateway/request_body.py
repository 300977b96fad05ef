"""Reading a JSON request body into a typed Struct, with every way it can be wrong a 4xx
that says what was wrong and where: 415 for a body that is not declared JSON, 413 for one
over the size limit (refused while it streams in, never buffered whole), 408 for one that
stops arriving, 400 otherwise, with `code` saying which kind (docs/security.md, "Bad input"
table lists them all)."""

from __future__ import annotations

import asyncio
import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request

from pagedserve.services.gateway.errors import GatewayError, invalid_request

T = TypeVar("T")

# msgspec names the offending field either as a path ("- at `$.messages[0].role`") or,
# for unknown/missing fields, in backquotes; OpenAI's `param` wants the field name.
_PATH = re.compile(r"- at `(?:key` in `)?\$\.?([^`]*)`")  # "key in": a dict's key (logit_bias)
_FIELD = re.compile(r"(?:unknown|required) field `([^`]+)`")


def _validation_error(error: msgspec.ValidationError) -> GatewayError:
    text = str(error)
    param = _param_of(text)
    if "unknown field" in text:
        # OpenAI's wording for a parameter it does not implement.
        return invalid_request(f"Unrecognized request argument supplied: {param or text}", param, code="unknown_parameter")
    if "missing required field" in text:
        return invalid_request(f"invalid request: {text}", param, code="missing_required_parameter")
    if ", got `" in text:
        return invalid_request(f"invalid request: {text}", param, code="invalid_type")
    return invalid_request(f"invalid request: {text}", param)


def _param_of(text: str) -> str | None:
    field = _FIELD.search(text)
    path = _PATH.search(text)
    if field and path and path.group(1):
        return f"{path.group(1)}.{field.group(1)}"
    if field:
        return field.group(1)
    if path and path.group(1):
        return path.group(1).replace("[...]", "")  # msgspec's "[...]": some dict value (logit_bias)
    return None


async def read_body(request: Request, max_body_bytes: int, timeout_s: float) -> bytes:
    """The raw body, refused early (413) when it announces or grows beyond the limit, so a
    huge upload is never held in memory; and 408 when it has not all arrived within
    `timeout_s`, so a client that stalls mid-body does not hold a connection for ever."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request(f"invalid Content-Length header: {declared[:40]!r}", code="invalid_header")
        # Length first: int() of thousands of digits is slow (and refused past 4,300).
        if len(declared.lstrip("0")) > len(str(max_body_bytes)) or int(declared) > max_body_bytes:
            raise GatewayError(413, f"request body of {declared[:40]} bytes exceeds the limit of {max_body_bytes:,} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise GatewayError(413, f"request body exceeds the limit of {max_body_bytes:,} bytes", code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(408, f"the request body did not arrive within {timeout_s:g} s ({size:,} bytes received)", code="request_timeout") from None
    except ClientDisconnect:
        # Nobody will read the answer; a 400 keeps it out of the unexpected-error log.
        raise invalid_request("client disconnected while sending the request body", code="client_disconnected") from None
    return b"".join(chunks)


async def read_json_body(request: Request, body_type: type[T], *, max_body_bytes: int, timeout_s: float) -> T:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise GatewayError(
            415, f"Content-Type must be application/json, got {content_type[:80] or 'none'!r}", code="unsupported_media_type"
        )
    body = await read_body(request, max_body_bytes, timeout_s)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise invalid_request(f"request body is not valid UTF-8 (byte {error.start})", code="invalid_json") from None
    if not body.strip():
        raise invalid_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=body_type)
    except msgspec.ValidationError as error:
        if not _INTEGRAL_FLOAT_REFUSED.search(str(error)):
            raise _validation_error(error) from None
        first_error = error
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise invalid_request(f"request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        # A free-form field (a JSON schema, tool parameters) nested deeper than the decoder's
        # stack allows (~500 levels here): typed fields say where, these cannot.
        raise invalid_request("request body nests objects and arrays too deep to decode (a few hundred levels)") from None
    # An integer written as a float (`"max_tokens": 461.0`): JSON Schema calls it an
    # integer, and OpenAI (pydantic) accepts it; msgspec does not. Only on this rare path
    # is the body decoded twice, with every integral float made an int (a number field
    # takes ints too, so nothing else changes).
    try:
        return msgspec.json.decode(msgspec.json.encode(_integral_floats_as_ints(msgspec.json.decode(body))), type=body_type)
    except msgspec.ValidationError as error:
        raise _validation_error(error) from None
    except RecursionError:  # nested too deep to rewrite: the first answer stands
        raise _validation_error(first_error) from None


_INTEGRAL_FLOAT_REFUSED = re.compile(r"Expected `int[^`]*`, got `float`")  # `int`, `int | null`...


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    return value
