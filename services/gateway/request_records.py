"""Request metadata mirrored to Redis (`req:{id}` hashes), off the request path.

Handlers call `record()`, which only appends to a bounded in-memory queue; one
background task drains it in batches through a non-transactional pipeline. Redis is a
record, not a dependency: when it is slow or down, batches are dropped (counted and
logged once per outage), the gateway keeps serving, and /health says "degraded".
Every write refreshes the key's TTL, so records of finished requests expire and so do
those of a gateway that died mid-request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_MAX_QUEUED = 10_000  # records held while Redis is slow; beyond this new ones are dropped
_MAX_BATCH = 256
_WRITE_TIMEOUT_S = 2.0
_RETRY_AFTER_FAILURE_S = 1.0
_PING_TIMEOUT_S = 0.5

Fields = dict[str, str | int | float]


def record_key(request_id: str) -> str:
    return f"req:{request_id}"


class RequestRecorder:
    """`redis_url=None` makes every method a no-op and health "disabled"."""

    def __init__(self, redis_url: str | None, ttl_s: int = 24 * 3600) -> None:
        self._redis_url = redis_url
        self._ttl_s = ttl_s
        self._client: aioredis.Redis | None = None
        self._queue: asyncio.Queue[tuple[str, Fields]] = asyncio.Queue(_MAX_QUEUED)
        self._writer: asyncio.Task[None] | None = None
        self._healthy = True
        self.num_dropped = 0

    @property
    def enabled(self) -> bool:
        return self._redis_url is not None

    async def start(self) -> None:
        if self._redis_url is None:
            return
        self._client = aioredis.from_url(self._redis_url, socket_timeout=_WRITE_TIMEOUT_S, socket_connect_timeout=_WRITE_TIMEOUT_S)
        self._writer = asyncio.create_task(self._write_loop(), name="redis-request-records")

    async def close(self, drain_timeout_s: float = 1.0) -> None:
        if self._writer is not None:
            # Let queued records out (a clean shutdown should not lose the last finishes).
            deadline = asyncio.get_running_loop().time() + drain_timeout_s
            while not self._queue.empty() and self._healthy and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def record(self, request_id: str, fields: Fields) -> None:
        """Merge `fields` into `req:{request_id}`; never blocks, never raises."""
        if self._writer is None:
            return
        try:
            self._queue.put_nowait((record_key(request_id), fields))
        except asyncio.QueueFull:
            self.num_dropped += 1

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
            log.warning("redis at %s is not answering (%s): request records are being dropped", self._redis_url, error)
        self._healthy = healthy

    async def _write_loop(self) -> None:
        assert self._client is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            pipe: Any = self._client.pipeline(transaction=False)
            for key, fields in batch:
                pipe.hset(key, mapping=fields)
                pipe.expire(key, self._ttl_s)
            try:
                await asyncio.wait_for(pipe.execute(), _WRITE_TIMEOUT_S)
            except (RedisError, OSError, asyncio.TimeoutError) as error:
                self.num_dropped += len(batch)
                self._set_healthy(False, error)
                await asyncio.sleep(_RETRY_AFTER_FAILURE_S)
            else:
                self._set_healthy(True)
