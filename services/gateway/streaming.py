"""HTTP plumbing for responses that take a while: SSE framing, and noticing that the
client has gone so its requests can be aborted at the scheduler.

A client that disconnects must free its KV blocks now, not when the next token fails to
send (which, for a request still queued, could be minutes). Both the wait before the
response starts and the stream itself therefore race the work against the ASGI
`http.disconnect` message; the loser is cancelled, and the handlers' `finally` aborts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class ClientDisconnected(Exception):
    """The client went away before the response started."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientDisconnected (with `work` cancelled) if the client
    disconnects first. Call only after the body has been read."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_task.cancel()
        raise
    finally:
        watcher.cancel()
    if not work_task.done():
        work_task.cancel()
        await asyncio.gather(work_task, return_exceptions=True)
        raise ClientDisconnected()
    return work_task.result()


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client's disconnect while
    streaming (Starlette stops doing so for ASGI servers speaking spec 2.4, relying on a
    failed send instead), so an idle stream is cancelled as soon as the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as task_group:

            async def stream_then_stop() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-send; the cancel below cleans up
                task_group.cancel_scope.cancel()

            task_group.start_soon(stream_then_stop)
            await _wait_for_disconnect(receive)
            task_group.cancel_scope.cancel()
