"""Driving a Generation into an HTTP response: one JSON body, or an SSE stream.

Shared by both endpoints; what differs between them (chunk and body shapes) is a
`ResponseFormat`. The HTTP status is decided by the first event: the response does not
start until the scheduler has produced something, so a refusal (429 queue full, 503 no
executor) is a real HTTP error, not an error event inside a 200 stream. Errors after the
stream started become an `{"error": ...}` event followed by [DONE], which the OpenAI SDK
raises as an APIError.

A request that runs past its deadline likewise: a 504 (code `timeout`) if nothing was
generated yet; otherwise a stream sends each unfinished choice's last chunk with
finish_reason "abort", the usage chunk if asked for, then the error event, and a
non-streaming request returns (200) what was generated, those choices with
finish_reason "abort".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from pagedserve.services.gateway.context import gateway_context
from pagedserve.services.gateway.errors import GatewayError
from pagedserve.services.gateway.generation import ChoiceDelta, ChoiceResult, Generation
from pagedserve.services.gateway.openai_protocol import Usage
from pagedserve.services.gateway.streaming import SSE_DONE, ClientDisconnected, EventStreamResponse, sse_event, unless_disconnected

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody receives it


class ResponseFormat(Protocol):
    def stream_start(self) -> list[bytes]:
        """Chunks sent before any token (chat announces the assistant role)."""
        ...

    def stream_chunk(self, deltas: list[ChoiceDelta]) -> bytes | None:
        """One chunk for one step's deltas; None when there is nothing to send."""
        ...

    def stream_usage(self, usage: Usage) -> bytes:
        ...

    def whole(self, results: list[ChoiceResult], usage: Usage) -> bytes:
        ...


async def respond(request: Request, generation: Generation, response_format: ResponseFormat, *, stream: bool, include_usage: bool) -> Response:
    if not stream:
        try:
            await generation.submit()
            results = await unless_disconnected(request, generation.run_to_end())
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            generation.close()
        if generation.timed_out and not any(result.token_ids for result in results):
            raise generation.timeout_error()
        return Response(response_format.whole(results, generation.usage()), media_type="application/json")

    try:
        await generation.submit()
        first = await unless_disconnected(request, generation.next_deltas())
        if generation.timed_out:  # before the first token: nothing to stream
            raise generation.timeout_error()
    except ClientDisconnected:
        generation.close()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except BaseException:
        generation.close()
        raise
    write_timeout_s = gateway_context(request).config.stream_write_timeout_s
    return EventStreamResponse(_events(generation, response_format, first, include_usage), write_timeout_s)


async def _events(generation: Generation, response_format: ResponseFormat, first: list[ChoiceDelta], include_usage: bool) -> AsyncIterator[bytes]:
    try:
        for chunk in response_format.stream_start():
            yield chunk
        deltas = first
        while True:
            chunk = response_format.stream_chunk(deltas)
            if chunk is not None:
                yield chunk
            if generation.finished:
                break
            try:
                deltas = await generation.next_deltas()
            except GatewayError as error:
                log.warning("request %s failed mid-stream: %s", generation.request_id, error.message)
                yield sse_event(msgspec.json.encode(error.body()))
                yield SSE_DONE
                return
        if include_usage:
            yield response_format.stream_usage(generation.usage())
        if generation.timed_out:
            log.info("request %s ran past its deadline mid-stream", generation.request_id)
            yield sse_event(msgspec.json.encode(generation.timeout_error().body()))
        yield SSE_DONE
    finally:
        # Also on cancellation (the client disconnected): aborts whatever still runs.
        generation.close()
