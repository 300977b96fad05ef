"""Mirror of scheduler state into Redis: request progress, this replica's load, and the
prefixes its KV cache holds.

Writes go through a bounded queue to a background thread that batches them into one
pipeline, so the scheduling loop never waits on Redis. If Redis is down, updates are
dropped (the queue is bounded) and `healthy` turns False; they resume when it is back.

Cached prefixes: the sorted set `prefix:{replica_id}` has one member per cached full
block, its hash in hex (`services/scheduler/prefix_cache.py`: the same tokens give the same
hash everywhere), scored by its last use (wall-clock seconds). A gateway can hash a
prompt's blocks and route to the replica holding the longest chain. Dropped updates make
it approximate, which routing tolerates: a wrong guess only costs a recompute.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, NamedTuple

import redis

from services.scheduler.prefix_cache import PrefixCacheEvent

log = logging.getLogger("pagedserve.scheduler.redis")

REQUEST_TTL_S = 24 * 3600


def prefix_cache_key(replica_id: str) -> str:
    return f"prefix:{replica_id}"


class _HashUpdate(NamedTuple):
    key: str
    fields: dict[str, Any]
    expire: bool


class _PrefixUpdate(NamedTuple):
    """Members to (re)score and members to remove; `clear` empties the set first."""

    stored: dict[str, float]
    evicted: list[str]
    clear: bool = False


class RedisMirror:
    def __init__(self, url: str, replica_id: str, max_pending: int = 10_000) -> None:
        self.replica_id = replica_id
        self.prefix_key = prefix_cache_key(replica_id)
        self.client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.pending: queue.Queue[_HashUpdate | _PrefixUpdate] = queue.Queue(max_pending)
        self.healthy = True
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="redis-mirror", daemon=True)
        self.thread.start()

    def update(self, key: str, fields: dict[str, Any], expire: bool = False) -> None:
        """Queue an HSET of `fields` into `key` (EXPIRE after it when `expire`); never
        blocks: dropped when the queue is full."""
        self._put(_HashUpdate(key, fields, expire))

    def update_prefix_cache(self, events: list[PrefixCacheEvent]) -> None:
        """Queue the changes to this replica's cached prefixes (from the scheduler core),
        oldest first; the last event of a hash wins. Never blocks."""
        if not events:
            return
        now = time.time()
        latest = {event.block_hash.hex(): event.stored for event in events}
        stored = {member: now for member, is_stored in latest.items() if is_stored}
        self._put(_PrefixUpdate(stored, [member for member, is_stored in latest.items() if not is_stored]))

    def clear_prefix_cache(self) -> None:
        """Queue emptying this replica's prefix set (a new scheduler core: nothing cached)."""
        self._put(_PrefixUpdate({}, [], clear=True))

    def _put(self, update: _HashUpdate | _PrefixUpdate) -> None:
        try:
            self.pending.put_nowait(update)
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
            for _ in batch:  # lets a reader wait until everything queued is written
                self.pending.task_done()

    def _write(self, batch: list[_HashUpdate | _PrefixUpdate]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for update in batch:
                if isinstance(update, _HashUpdate):
                    pipe.hset(update.key, mapping={k: _redis_value(v) for k, v in update.fields.items()})
                    if update.expire:
                        pipe.expire(update.key, REQUEST_TTL_S)
                    continue
                if update.clear:
                    pipe.delete(self.prefix_key)
                if update.evicted:
                    pipe.zrem(self.prefix_key, *update.evicted)
                if update.stored:
                    pipe.zadd(self.prefix_key, update.stored)
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
