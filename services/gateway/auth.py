"""Bearer-token checks, as ASGI middleware so no route can forget them.

/v1/* (and vLLM's /tokenize, /detokenize) needs the API key, /admin/* data endpoints the
admin key, each only when set.
The /admin page itself is static and holds no data: it asks for the key in the browser.
Keys are compared in constant time, so response timing does not leak a key's prefix.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedserve.services.gateway.errors import GatewayError


def bearer_token_matches(authorization: str | None, key: str) -> bool:
    if authorization is None:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8"))


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key

    def _key_for(self, path: str) -> tuple[str | None, str]:
        if path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
            return self.api_key, "API key"
        if path.startswith("/admin/"):
            return self.admin_key, "admin key"
        return None, ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            key, what = self._key_for(scope["path"])
            if key is not None and not bearer_token_matches(Headers(scope=scope).get("authorization"), key):
                error = GatewayError(401, f"missing or incorrect {what}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                response = error.to_response()
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
