"""Request metadata mirrored to Redis (`req:{id}` hashes), off the request path.

Handlers call `record()`, which only merges the fields into a bounded in-memory buffer
(one entry per key: a request's later fields overwrite its earlier ones, as HSET would);
one background task writes the buffer out in batches through a non-transactional
pipeline. Redis is a record, not a dependency: when it is slow or down, a failed batch
goes back into the buffer and is retried every second, the gateway keeps serving, and
/health says "degraded"; once Redis is back, what was recorded meanwhile is written. Only
when the buffer holds `_MAX_BUFFERED` keys or `_MAX_BUFFERED_BYTES` of fields are further
records dropped (counted): by count alone, 10,000 requests each carrying a 1 MiB grammar in
their sampling parameters could have held 10 GB. Every write refreshes the key's TTL, so records of finished requests expire and
so do those of a gateway that died mid-request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_MAX_BUFFERED = 10_000  # keys held while Redis is slow or down; records of more are dropped
_MAX_BUFFERED_BYTES = 64 << 20  # and their fields' size (as text) in all
_MAX_BATCH = 256
_WRITE_TIMEOUT_S = 2.0
_RETRY_AFTER_FAILURE_S = 1.0
_PING_TIMEOUT_S = 0.5

Fields = dict[str, str | int | float]


def record_key(request_id: str) -> str:
    return f"req:{request_id}"


def _entry_bytes(key: str, fields: Fields) -> int:
    """About what the entry costs to hold and write: its text."""
    return len(key) + sum(len(name) + len(value) if isinstance(value, str) else len(name) + 8 for name, value in fields.items())


class RequestRecorder:
    """`redis_url=None` makes every method a no-op and health "disabled"."""

    def __init__(self, redis_url: str | None, ttl_s: int = 24 * 3600) -> None:
        self._redis_url = redis_url
        self._ttl_s = ttl_s
        self._client: aioredis.Redis | None = None
        # key -> fields not yet written; insertion order is age (oldest written first).
        self._buffer: dict[str, Fields] = {}
        self._buffered_bytes = 0  # sum of _entry_bytes over the buffer
        self._buffered = asyncio.Event()  # set when the buffer has something
        self._writer: asyncio.Task[None] | None = None
        self._healthy = True
        self.num_dropped = 0

    async def start(self) -> None:
        if self._redis_url is None:
            return
        self._client = aioredis.from_url(self._redis_url, socket_timeout=_WRITE_TIMEOUT_S, socket_connect_timeout=_WRITE_TIMEOUT_S)
        self._writer = asyncio.create_task(self._write_loop(), name="redis-request-records")

    async def close(self, drain_timeout_s: float = 1.0) -> None:
        if self._writer is not None:
            # Let queued records out (a clean shutdown should not lose the last finishes).
            deadline = asyncio.get_running_loop().time() + drain_timeout_s
            while self._buffer and self._healthy and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def record(self, request_id: str, fields: Fields) -> None:
        """Merge `fields` into `req:{request_id}`; never blocks, never raises."""
        if self._writer is None:
            return
        key = record_key(request_id)
        buffered = self._buffer.get(key)
        merged = fields if buffered is None else buffered | fields
        growth = _entry_bytes(key, merged) - (0 if buffered is None else _entry_bytes(key, buffered))
        if (buffered is None and len(self._buffer) >= _MAX_BUFFERED) or self._buffered_bytes + growth > _MAX_BUFFERED_BYTES:
            self.num_dropped += 1
            return
        self._buffer[key] = dict(merged)
        self._buffered_bytes += growth
        self._buffered.set()

    @property
    def num_buffered(self) -> int:
        """Keys waiting to be written (all of them while Redis is down)."""
        return len(self._buffer)

    @property
    def num_buffered_bytes(self) -> int:
        return self._buffered_bytes

    async def health(self) -> str:
        """"ok", "degraded" (configured but not answering) or "disabled"."""
        if self._client is None:
            return "disabled"
        try:
            await asyncio.wait_for(self._client.ping(), _PING_TIMEOUT_S)
        except (RedisError, OSError, asyncio.TimeoutError):
            self._set_healthy(False)
        else:
            self._set_healthy(True)
        return "ok" if self._healthy else "degraded"

    def _set_healthy(self, healthy: bool, error: BaseException | None = None) -> None:
        if healthy and not self._healthy:
            log.info("redis at %s is answering again", self._redis_url)
        elif not healthy and self._healthy:
            log.warning("redis at %s is not answering (%s): request records are buffered until it is back", self._redis_url, error)
        self._healthy = healthy

    async def _write_loop(self) -> None:
        assert self._client is not None
        while True:
            await self._buffered.wait()
            self._buffered.clear()
            while self._buffer:
                batch = [(key, self._buffer.pop(key)) for key in list(itertools.islice(self._buffer, _MAX_BATCH))]
                self._buffered_bytes -= sum(_entry_bytes(key, fields) for key, fields in batch)
                pipe: Any = self._client.pipeline(transaction=False)
                for key, fields in batch:
                    pipe.hset(key, mapping=fields)
                    pipe.expire(key, self._ttl_s)
                try:
                    await asyncio.wait_for(pipe.execute(), _WRITE_TIMEOUT_S)
                except (RedisError, OSError, asyncio.TimeoutError) as error:
                    self._set_healthy(False, error)
                    self._put_back(batch)
                    await asyncio.sleep(_RETRY_AFTER_FAILURE_S)
                else:
                    self._set_healthy(True)

    def _put_back(self, batch: list[tuple[str, Fields]]) -> None:
        """A failed batch goes back to the front of the buffer (it is older than anything
        recorded since, whose fields win). The bound may be exceeded by one batch."""
        rest = self._buffer
        self._buffer = {key: fields | rest.pop(key, {}) for key, fields in batch}
        self._buffer.update(rest)
        self._buffered_bytes = sum(_entry_bytes(key, fields) for key, fields in self._buffer.items())
