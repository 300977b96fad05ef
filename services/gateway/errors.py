"""Every failure leaves the gateway as an OpenAI-style error body with the right status.

Inside the gateway a failure is a `GatewayError` raised from wherever it is found; the
exception handlers installed by `create_app` turn it (and Starlette's own 404/405, and
anything unexpected) into `{"error": {"message", "type", "param", "code"}}`, so clients
written for OpenAI parse every error the same way.
"""

from __future__ import annotations

import logging
import math

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)

# OpenAI's `type` per status; `code` narrows it where OpenAI has one.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class GatewayError(Exception):
    """A failure with the HTTP status it should be answered with."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> ErrorBody:
        error_type = _TYPE_BY_STATUS.get(self.status_code, "server_error" if self.status_code >= 500 else "invalid_request_error")
        return ErrorBody(ErrorDetail(self.message, error_type, self.param, self.code))

    def to_response(self) -> Response:
        headers = {}
        if self.retry_after_s is not None:
            # Retry-After takes whole seconds; never 0, which would invite a hot retry loop.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return Response(msgspec.json.encode(self.body()), self.status_code, headers, media_type="application/json")


def invalid_request(message: str, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    """A 400. `code` says what kind of mistake (docs/security.md, "Bad input"): `invalid_value` for a
    field out of range or inconsistent with another, unless a narrower code fits."""
    return GatewayError(400, message, param=param, code=code)


async def gateway_error_handler(request: Request, error: Exception) -> Response:
    assert isinstance(error, GatewayError)
    return error.to_response()


async def http_exception_handler(request: Request, error: Exception) -> Response:
    """Starlette's routing errors (unknown path, wrong method) in OpenAI's shape."""
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
    elif error.status_code == 405:
        message, code = f"Method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
    else:
        message, code = str(error.detail), None
    response = GatewayError(error.status_code, message, code=code).to_response()
    if error.headers:
        response.headers.update(error.headers)
    return response


async def unexpected_error_handler(request: Request, error: Exception) -> Response:
    """The last resort: a bug, not client input (that is a GatewayError before here)."""
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return GatewayError(500, f"internal error: {type(error).__name__}").to_response()
