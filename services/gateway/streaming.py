"""HTTP plumbing for responses that take a while: SSE framing, and noticing that the
client has gone so its requests can be aborted at the scheduler.

A client that disconnects must free its KV blocks now, not when the next token fails to
send (which, for a request still queued, could be minutes). Both the wait before the
response starts and the stream itself therefore race the work against the ASGI
`http.disconnect` message; the loser is cancelled, and the handlers' `finally` aborts.

A client that stays connected but stops reading is treated the same way once one chunk
has waited `write_timeout_s` to be written: uvicorn's send blocks while the socket's
buffers are full, and nothing (not even the request's deadline) would end the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

T = TypeVar("T")

log = logging.getLogger(__name__)

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

    def __init__(self, content: AsyncIterator[bytes], write_timeout_s: float) -> None:
        super().__init__(content, headers=SSE_HEADERS)
        self._write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            async with asyncio.timeout(self._write_timeout_s):
                await send(message)

        async with anyio.create_task_group() as task_group:

            async def stream_then_stop() -> None:
                try:
                    await self.stream_response(send_in_time)
                except OSError:
                    pass  # the client went away mid-send; the cancel below cleans up
                except TimeoutError:  # the client stopped reading: as good as gone
                    log.warning("a client read nothing for %g s: its stream is ended", self._write_timeout_s)
                task_group.cancel_scope.cancel()

            task_group.start_soon(stream_then_stop)
            await _wait_for_disconnect(receive)
            task_group.cancel_scope.cancel()
