"""Mirror of scheduler state into Redis: request progress and this replica's load.

Writes go through a bounded queue to a background thread that batches them into one
pipeline, so the scheduling loop never waits on Redis. If Redis is down, updates are
dropped (the queue is bounded) and `healthy` turns False; they resume when it is back.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import redis

log = logging.getLogger("pagedserve.scheduler.redis")

REQUEST_TTL_S = 24 * 3600


class RedisMirror:
    def __init__(self, url: str, replica_id: str, max_pending: int = 10_000) -> None:
        self.replica_id = replica_id
        self.client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.pending: queue.Queue[tuple[str, dict[str, Any], bool]] = queue.Queue(max_pending)
        self.healthy = True
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="redis-mirror", daemon=True)
        self.thread.start()

    def update(self, key: str, fields: dict[str, Any], expire: bool = False) -> None:
        """Queue an HSET of `fields` into `key` (EXPIRE after it when `expire`); never
        blocks: dropped when the queue is full."""
        try:
            self.pending.put_nowait((key, fields, expire))
        except queue.Full:
            pass

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=3)
        self.client.close()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                batch = [self.pending.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < 500:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[str, dict[str, Any], bool]]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, fields, finished in batch:
                pipe.hset(key, mapping={k: _redis_value(v) for k, v in fields.items()})
                if finished:
                    pipe.expire(key, REQUEST_TTL_S)
            pipe.execute()
            if not self.healthy:
                log.info("redis is reachable again")
            self.healthy = True
        except redis.RedisError as error:
            if self.healthy:
                log.warning("redis unreachable, metadata updates dropped until it is back: %s", error)
            self.healthy = False


def _redis_value(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return str(value)
