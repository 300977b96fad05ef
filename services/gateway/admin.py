"""Admin routes: the scheduler's live status as JSON, and a page that draws it.

The JSON is the StatusSnapshot as the scheduler sent it, with named fields (one schema,
defined in shared/messages.py); the page polls it once a second.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from services.gateway.admin_page import ADMIN_PAGE_HTML
from services.gateway.context import gateway_context
from services.gateway.errors import GatewayError


async def admin_page(request: Request) -> Response:
    return HTMLResponse(ADMIN_PAGE_HTML, headers={"Cache-Control": "no-cache"})


async def scheduler_status(request: Request) -> Response:
    context = gateway_context(request)
    # Several open dashboards share one query per half second.
    snapshot = await context.scheduler.status(context.config.status_timeout_s, max_age_s=0.5)
    if snapshot is None:
        raise GatewayError(
            503, f"the scheduler at {context.config.scheduler_address} did not answer within {context.config.status_timeout_s:g} s",
            code="service_unavailable",
        )
    # The wire struct is array_like (compact MessagePack); the page wants named fields.
    named = msgspec.structs.asdict(snapshot)
    return Response(msgspec.json.encode(named), media_type="application/json", headers={"Cache-Control": "no-store"})
