"""Admin routes: the scheduler's live status as JSON, and a page that draws it.

The JSON is the StatusSnapshot as the scheduler sent it, with named fields (one schema,
defined in shared/messages.py); the page polls it once a second.
"""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from pagedserve.services.gateway.admin_page import ADMIN_PAGE_HTML
from pagedserve.services.gateway.context import gateway_context
from pagedserve.services.gateway.errors import GatewayError
from pagedserve.shared.messages import StatusSnapshot


async def admin_page(request: Request) -> Response:
    return HTMLResponse(ADMIN_PAGE_HTML, headers={"Cache-Control": "no-cache"})


async def scheduler_status(request: Request) -> Response:
    """The first answering replica's snapshot at the top level (what the page draws), and
    under `replicas` every replica: its id, address, load as routing sees it, and its own
    snapshot (queues, cached blocks, block map), or null when it did not answer."""
    context = gateway_context(request)
    replicas = context.replicas.all()
    # Several open dashboards share one query per half second per replica.
    snapshots = await asyncio.gather(*(
        r.client.status(context.config.status_timeout_s, max_age_s=0.5) if r.client.connected else _no_snapshot()
        for r in replicas
    ))
    answered = [s for s in snapshots if s is not None]
    if not answered:
        raise GatewayError(
            503, f"no scheduler replica answered within {context.config.status_timeout_s:g} s "
            f"(replicas: {', '.join(r.address for r in replicas)})",
            code="service_unavailable",
        )
    # The wire struct is array_like (compact MessagePack); the page wants named fields.
    named = msgspec.structs.asdict(answered[0])
    named["replicas"] = [
        {
            "replica_id": replica.replica_id, "address": replica.address, "routable": replica.routable,
            "load": replica.load, "in_flight_here": replica.num_in_flight,
            "snapshot": msgspec.structs.asdict(snapshot) if snapshot is not None else None,
        }
        for replica, snapshot in zip(replicas, snapshots)
    ]
    return Response(msgspec.json.encode(named), media_type="application/json", headers={"Cache-Control": "no-store"})


async def _no_snapshot() -> StatusSnapshot | None:
    return None
