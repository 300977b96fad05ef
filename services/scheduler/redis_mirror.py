"""What only this scheduler knows, mirrored into Redis: its replica's load
(`replica:{replica_id}`) and the prefixes its KV cache holds (`prefix:{replica_id}`).
Request records (`req:{id}`) are the gateway's (services/gateway/request_records.py): one
writer per key.

Redis is a record, not a dependency, and the scheduling loop never waits on it. Updates
merge into an in-memory buffer (the replica's fields: the latest value of each; the prefix
set: the net change since the last write) that a background thread writes out through a
non-transactional pipeline. While Redis is down a failed write goes back under whatever
came since, and is retried every second; once Redis is back, the merged state is written
as one. The buffer is bounded: past `max_buffered_prefixes` pending prefix changes,
further ones are dropped (counted), which makes the set approximate until the next core
clears it. Routing tolerates that: a wrong guess only costs a recompute.

A Redis that restarted empty (a new `run_id`) has lost the set: the mirror then asks for
a resynchronisation (`resync_wanted`), and the scheduler loop hands it every cached hash
(`resync_prefix_cache`), written as a clear plus the full set. Without it, routing by
prefix found nothing on that replica until each block happened to be stored again.

Cached prefixes: the sorted set `prefix:{replica_id}` has one member per cached full
block, its hash in hex (`services/scheduler/prefix_cache.py`: the same tokens give the same
hash everywhere), scored by its last use (wall-clock seconds). A gateway hashes a
prompt's blocks and routes to the replica holding the longest chain
(services/gateway/router.py). Each write of the replica's fields also adds its id to the
`replicas` set: that is the registration gateways discover (shared/redis_keys.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
import redis

from pagedserve.services.scheduler.prefix_cache import PrefixCacheEvent
from pagedserve.shared.redis_keys import REPLICAS_KEY, prefix_cache_key, replica_key

log = logging.getLogger(__name__)

_MAX_BUFFERED_PREFIXES = 100_000  # pending prefix members while Redis is slow or down
_SOCKET_TIMEOUT_S = 1.0
_RETRY_AFTER_FAILURE_S = 1.0

ReplicaFields = dict[str, str | int | float]


__all__ = ["RedisMirror", "prefix_cache_key", "replica_key"]


@dataclass
class _PrefixChanges:
    """The net change to the prefix set since it was last written: applying it once equals
    applying every event in order (`stored` and `evicted` never share a member)."""

    clear: bool = False  # delete the whole set first (a new core: nothing cached)
    stored: dict[str, float] = field(default_factory=dict)  # member -> last use
    evicted: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.stored) + len(self.evicted)

    def store(self, member: str, last_used: float) -> None:
        self.evicted.discard(member)
        self.stored[member] = last_used

    def evict(self, member: str) -> None:
        self.stored.pop(member, None)
        self.evicted.add(member)

    def then(self, newer: _PrefixChanges) -> _PrefixChanges:
        """These changes followed by `newer`'s, as one."""
        if newer.clear:
            return newer
        merged = _PrefixChanges(self.clear, dict(self.stored), set(self.evicted))
        for member in newer.evicted:
            merged.evict(member)
        for member, last_used in newer.stored.items():
            merged.store(member, last_used)
        return merged


class RedisMirror:
    def __init__(self, url: str, replica_id: str, max_buffered_prefixes: int = _MAX_BUFFERED_PREFIXES) -> None:
        self.replica_id = replica_id
        self.replica_key = replica_key(replica_id)
        self.prefix_key = prefix_cache_key(replica_id)
        self.client = redis.Redis.from_url(url, socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=_SOCKET_TIMEOUT_S)
        self._max_buffered_prefixes = max_buffered_prefixes
        # Guards the buffer and `_writing`; notified when a write ends or something is buffered.
        self._changed = threading.Condition()
        self._replica: ReplicaFields = {}
        self._prefixes = _PrefixChanges()
        self._writing = False  # a batch taken out of the buffer is being written
        self.healthy = True
        self.num_dropped = 0  # prefix changes dropped because the buffer was full
        self.resync_wanted = threading.Event()  # Redis lost the prefix set: the scheduler resends it
        self._run_id: str | None = None  # the Redis server's, to notice a restart
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-mirror", daemon=True)
        self._thread.start()

    # -- what the scheduler calls (never blocks on Redis) --------------------------------

    def update_replica(self, fields: ReplicaFields) -> None:
        """Merge `fields` into this replica's hash."""
        with self._changed:
            self._replica.update(fields)
            self._changed.notify_all()

    def update_prefix_cache(self, events: list[PrefixCacheEvent]) -> None:
        """The changes to this replica's cached prefixes (from the scheduler core), oldest
        first; the last event of a hash wins."""
        if not events:
            return
        now = time.time()
        with self._changed:
            prefixes = self._prefixes
            for event in events:
                member = event.block_hash.hex()
                if member not in prefixes.stored and member not in prefixes.evicted and len(prefixes) >= self._max_buffered_prefixes:
                    self.num_dropped += 1
                elif event.stored:
                    prefixes.store(member, now)
                else:
                    prefixes.evict(member)
            self._changed.notify_all()

    def resync_prefix_cache(self, block_hashes: list[bytes]) -> None:
        """Replace the set with exactly these hashes (every block the core has cached):
        called by the scheduler loop, after the events so far, when `resync_wanted`."""
        now = time.time()
        with self._changed:
            stored = {block_hash.hex(): now for block_hash in block_hashes[: self._max_buffered_prefixes]}
            self.num_dropped += max(0, len(block_hashes) - len(stored))
            self._prefixes = _PrefixChanges(clear=True, stored=stored)
            self.resync_wanted.clear()
            self._changed.notify_all()

    def clear_prefix_cache(self) -> None:
        """Empty this replica's prefix set (a new scheduler core: nothing cached)."""
        with self._changed:
            self._prefixes = _PrefixChanges(clear=True)
            self._changed.notify_all()

    def wait_written(self, timeout_s: float) -> bool:
        """Wait until everything buffered so far is written (False: not within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._writing or self._has_buffered():
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return False
                self._changed.wait(remaining_s)
            return True

    def close(self, drain_timeout_s: float = 1.0) -> None:
        """Stop, first letting what is buffered out while Redis answers (a clean shutdown
        should not lose the last load report)."""
        if self.healthy:
            self.wait_written(drain_timeout_s)
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=3)
        self.client.close()

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                while not self._has_buffered() and not self._stop.is_set():
                    self._changed.wait()
                if self._stop.is_set():
                    return
                replica, self._replica = self._replica, {}
                prefixes, self._prefixes = self._prefixes, _PrefixChanges()
                self._writing = True
            written = self._write(replica, prefixes)
            with self._changed:
                if not written:
                    # Back under whatever came meanwhile, which is newer and wins.
                    self._replica = {**replica, **self._replica}
                    self._prefixes = prefixes.then(self._prefixes)
                self._writing = False
                self._changed.notify_all()
            if not written:
                self._stop.wait(_RETRY_AFTER_FAILURE_S)

    def _has_buffered(self) -> bool:
        return bool(self._replica or self._prefixes or self._prefixes.clear)

    def _write(self, replica: ReplicaFields, prefixes: _PrefixChanges) -> bool:
        try:
            pipe = self.client.pipeline(transaction=False)
            if replica:
                pipe.hset(self.replica_key, mapping=replica)
                pipe.sadd(REPLICAS_KEY, self.replica_id)  # registration: gateways discover replicas here
            if prefixes.clear:
                pipe.delete(self.prefix_key)
            if prefixes.evicted:
                pipe.zrem(self.prefix_key, *prefixes.evicted)
            if prefixes.stored:
                pipe.zadd(self.prefix_key, prefixes.stored)
            pipe.execute()
            run_id = self.client.info("server").get("run_id")
        except redis.RedisError as error:
            if self.healthy:
                log.warning("redis unreachable: replica and prefix updates are buffered until it is back: %s", error)
            self.healthy = False
            return False
        if not self.healthy:
            log.info("redis is reachable again: buffered updates written")
        self.healthy = True
        if self._run_id is not None and run_id != self._run_id:
            log.warning("redis restarted (run_id %s -> %s): resynchronising this replica's prefix set", self._run_id, run_id)
            self.resync_wanted.set()
        self._run_id = run_id
        return True
