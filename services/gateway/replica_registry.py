"""The replicas a gateway can send requests to: one SchedulerClient each, their last known
loads, and the per-request read of Redis that routing scores.

Replicas come from two places: `--scheduler-address` (one or more, comma-separated: what
a gateway with no Redis has) and the `replicas` set in Redis, where every scheduler
registers itself with its load and a heartbeat (`replica:{id}`, shared/redis_keys.py).
Both name a replica by the address gateways connect to, which keys this registry.

Redis is read once per request, never per token: one pipeline fetches the replica set,
every known replica's record and, for each, which of the prompt's block hashes its
`prefix:{id}` holds (ZMSCORE). When Redis does not answer, routing goes on from the last
loads it did report (plus this gateway's own count of what it has in flight on each),
Redis is skipped for a second so that requests do not each wait on it, and /health says
"degraded".

A replica is routable while its connection is up (ZeroMQ handshake done) and it has not
been marked failed. A scheduler that dies drops the connection: it leaves routing at
once. One whose executors are gone past its --executor-timeout answers 503s: the request
that got one marks it failed until it reports a live executor again (in its Redis
heartbeat or an info answer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pagedserve.services.gateway.router import (
    DEFAULT_LOAD_PENALTY_TOKENS,
    Candidate,
    RecentRoutes,
    RoundRobin,
    RoutingDecision,
    choose,
    longest_chain,
)
from pagedserve.services.gateway.scheduler_client import SchedulerClient
from pagedserve.shared.block_hashing import BlockHash, prompt_block_hashes
from pagedserve.shared.messages import SchedulerInfo
from pagedserve.shared.redis_keys import REPLICAS_KEY, ReplicaRecord, prefix_cache_key, replica_key
from pagedserve.shared.zmq_security import CurveEndpoint

log = logging.getLogger(__name__)

_REDIS_TIMEOUT_S = 0.5
_SKIP_REDIS_AFTER_FAILURE_S = 1.0
# A registered replica whose heartbeat (once a second) is older than this is not
# discovered (it may be gone for good), and is looked at again only this often, so a dead
# registration costs routing no extra Redis round trip per request.
_STALE_HEARTBEAT_S = 10.0
# A replica found in Redis (not named by --scheduler-address) that has been disconnected,
# with a heartbeat this old and nothing of ours in flight, is forgotten: its socket closed,
# gone from /health and the admin page. It is discovered again if it ever beats again.
_FORGET_AFTER_S = 60.0


@dataclass
class Replica:
    address: str
    client: SchedulerClient
    record: ReplicaRecord | None = None  # as Redis last reported it
    num_in_flight: int = 0  # scheduler requests this gateway has open there
    failed_at: float | None = None  # wall clock; set by a 503 from it, cleared by a live executor
    failed_connects: int = 0  # its client's handshakes at the failure: a new one (restart) clears it
    num_blocks_cached_total: int = 0  # its prefix set's size at the last read

    @property
    def replica_id(self) -> str:
        """Its id as it reports it (Redis or an info answer), else its address."""
        if self.record is not None:
            return self.record.replica_id
        info = self.client.latest_info
        return info.replica_id if info is not None else self.address

    @property
    def load(self) -> int:
        """The last reported requests running and waiting, but never fewer than this
        gateway itself has in flight there (reports are up to a second old)."""
        reported = 0
        if self.record is not None:
            reported = self.record.load
        elif self.client.latest_info is not None:
            reported = self.client.latest_info.num_running + self.client.latest_info.num_waiting
        return max(reported, self.num_in_flight)

    @property
    def routable(self) -> bool:
        if not self.client.connected:
            return False
        if self.failed_at is not None and self.client.num_connects > self.failed_connects:
            self.failed_at = None  # reconnected since: a restarted scheduler
        return self.failed_at is None

    def saw_info(self, info: SchedulerInfo | None, asked_at: float) -> None:
        """An info answer to a query sent at `asked_at` (wall clock): a live executor
        after the failure clears it."""
        if info is not None and info.num_executors_alive > 0 and self.failed_at is not None and asked_at > self.failed_at:
            self.failed_at = None


@dataclass
class RouteResult:
    replica: Replica
    decision: RoutingDecision
    block_hashes: list[BlockHash] = field(default_factory=list)


class ReplicaRegistry:
    def __init__(
        self, addresses: Sequence[str], gateway_id: str, redis_url: str | None, *, submit_timeout_s: float = 5.0,
        curve: CurveEndpoint | None = None, load_penalty_tokens: int = DEFAULT_LOAD_PENALTY_TOKENS,
        policy: str = "cache_aware",
    ) -> None:
        self._gateway_id = gateway_id
        self._submit_timeout_s = submit_timeout_s
        self._curve = curve
        self._redis_url = redis_url
        self._redis: aioredis.Redis | None = None
        self._redis_skip_until = 0.0  # monotonic
        self.redis_healthy = redis_url is not None
        self.load_penalty_tokens = load_penalty_tokens
        self._round_robin = RoundRobin() if policy == "round_robin" else None
        self.replicas: dict[str, Replica] = {}
        self._recent = RecentRoutes()
        self._started = False
        self._configured = frozenset(addresses)  # named by flags: never forgotten
        self._stale_ids: dict[str, float] = {}  # replica id -> monotonic time to look again
        for address in addresses:
            self._add(address)

    def _add(self, address: str) -> Replica:
        client = SchedulerClient(address, self._gateway_id, self._submit_timeout_s, curve=self._curve)
        replica = self.replicas[address] = Replica(address, client)
        return replica

    async def start(self) -> None:
        self._started = True
        for replica in self.replicas.values():
            await replica.client.start()
        if self._redis_url is not None:
            self._redis = aioredis.from_url(self._redis_url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S)
            await self.refresh()

    async def close(self) -> None:
        for replica in self.replicas.values():
            await replica.client.close()
        if self._redis is not None:
            await self._redis.aclose()

    @property
    def redis_enabled(self) -> bool:
        return self._redis is not None

    def all(self) -> list[Replica]:
        return list(self.replicas.values())

    def first_info(self) -> SchedulerInfo | None:
        """Any replica's latest info (for what every replica shares: model, context length)."""
        for replica in self.replicas.values():
            if replica.client.latest_info is not None and replica.client.latest_info.max_model_len > 0:
                return replica.client.latest_info
        return None

    # -- routing -------------------------------------------------------------------------

    async def route(
        self, prompt_token_ids: Sequence[int], exclude: Sequence[str] = (), cache_salt: str | None = None
    ) -> RouteResult | None:
        """The replica for a prompt (None: no replica is connected). One Redis round trip.
        Only a gateway that has never been connected to any replica (it just started)
        waits for a first connection, up to the submit timeout; once one has been, no
        replica connected is an answer at once."""
        if not any(r.client.connected or r.client.num_connects for r in self.replicas.values()):
            await self._wait_first_connection(self._submit_timeout_s)
        hashes_by_shape, chains = await self._read(prompt_token_ids, cache_salt)
        for replica in self.replicas.values():  # a shape this read learned: hash for it too
            shape = _shape(replica)
            if shape is not None and shape not in hashes_by_shape:
                hashes_by_shape[shape] = prompt_block_hashes(prompt_token_ids, shape[1], shape[0], cache_salt)
        candidates = [r for r in self.replicas.values() if r.routable and r.address not in exclude]
        if not candidates:
            # Every connected replica failed (its executors are gone): it queues requests
            # while an executor may still come back, which beats refusing them here.
            candidates = [r for r in self.replicas.values() if r.client.connected and r.address not in exclude]
        if not candidates:
            return None
        now = time.monotonic()
        views = []
        for replica in candidates:
            shape = _shape(replica)
            hashes = hashes_by_shape.get(shape, []) if shape else []
            cached = chains.get(replica.address, 0)
            if hashes:
                cached = max(cached, self._recent.longest_chain(replica.address, hashes, now))
            views.append(Candidate(replica.address, replica.load, cached, shape[1] if shape else 1, replica.num_blocks_cached_total))
        spread_key = bytes(str(list(prompt_token_ids[:16])), "ascii")
        if self._round_robin is not None:
            decision = self._round_robin.choose(views)
        else:
            decision = choose(views, spread_key, self.load_penalty_tokens)
        chosen = self.replicas[decision.key]
        shape = _shape(chosen)
        hashes = hashes_by_shape.get(shape, []) if shape else []
        self._recent.record(chosen.address, hashes, now)
        return RouteResult(chosen, decision, hashes)

    async def _wait_first_connection(self, timeout_s: float) -> None:
        waits = [asyncio.ensure_future(r.client.wait_connected(timeout_s)) for r in self.replicas.values()]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def refresh(self) -> None:
        """Read the registry from Redis (replicas, loads); on failure keep the last known."""
        await self._read(())

    async def _read(
        self, prompt_token_ids: Sequence[int], cache_salt: str | None = None
    ) -> tuple[dict[tuple[str, int], list[BlockHash]], dict[str, int]]:
        """Read the registry (and, for a prompt, each replica's cached chain of it) from
        Redis in one pipeline; on failure keep the last known state. Returns the prompt's
        block hashes per (model, block size) in use, and the chain each replica holds (by
        address; none when Redis did not answer)."""
        chains: dict[str, int] = {}
        hashes_by_shape: dict[tuple[str, int], list[BlockHash]] = {}
        for replica in self.replicas.values():
            shape = _shape(replica)
            if shape is not None and shape not in hashes_by_shape and prompt_token_ids:
                hashes_by_shape[shape] = prompt_block_hashes(prompt_token_ids, shape[1], shape[0], cache_salt)
        if self._redis is None or time.monotonic() < self._redis_skip_until:
            return hashes_by_shape, chains
        known = [r for r in self.replicas.values() if r.record is not None]
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.smembers(REPLICAS_KEY)
            for replica in known:
                assert replica.record is not None
                pipe.hgetall(replica_key(replica.record.replica_id))
                pipe.zcard(prefix_cache_key(replica.record.replica_id))
                hashes = hashes_by_shape.get(_shape(replica) or ("", 0), [])
                if hashes:
                    pipe.zmscore(prefix_cache_key(replica.record.replica_id), [h.hex() for h in hashes])
            results = await asyncio.wait_for(pipe.execute(), _REDIS_TIMEOUT_S)
            replica_ids = {member.decode() for member in results[0]}
            position = 1
            for replica in known:
                assert replica.record is not None
                fields, replica.num_blocks_cached_total = results[position], int(results[position + 1])
                position += 2
                if fields:
                    replica.record = ReplicaRecord.from_hash(replica.record.replica_id, fields)
                hashes = hashes_by_shape.get(_shape(replica) or ("", 0), [])
                if hashes:
                    chains[replica.address] = longest_chain([score is not None for score in results[position]])
                    position += 1
                self._clear_failure(replica)
            known_ids = {r.record.replica_id for r in known if r.record is not None}
            now = time.monotonic()
            new_ids = sorted(i for i in replica_ids - known_ids if self._stale_ids.get(i, 0.0) <= now)
            if new_ids:
                await self._discover(new_ids)
            await self._forget_dead(known)
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            self._redis_skip_until = time.monotonic() + _SKIP_REDIS_AFTER_FAILURE_S
            if self.redis_healthy:
                log.warning("redis unreachable: routing by the last known loads until it is back: %s", error)
            self.redis_healthy = False
            return hashes_by_shape, {}
        if not self.redis_healthy:
            log.info("redis is reachable again: routing by cached prefixes")
        self.redis_healthy = True
        return hashes_by_shape, chains

    async def _discover(self, replica_ids: list[str]) -> None:
        """Records of replicas this gateway has not matched to an address yet (rare: new
        replicas, or the first read)."""
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        for replica_id in replica_ids:
            pipe.hgetall(replica_key(replica_id))
        for replica_id, fields in zip(replica_ids, await asyncio.wait_for(pipe.execute(), _REDIS_TIMEOUT_S)):
            record = ReplicaRecord.from_hash(replica_id, fields) if fields else None
            if record is None or not record.gateway_address:
                self._stale_ids[replica_id] = time.monotonic() + _STALE_HEARTBEAT_S
                continue
            replica = self.replicas.get(record.gateway_address)
            if replica is None:
                if time.time() - record.heartbeat_at > _STALE_HEARTBEAT_S:
                    self._stale_ids[replica_id] = time.monotonic() + _STALE_HEARTBEAT_S
                    continue
                self._stale_ids.pop(replica_id, None)
                replica = self._add(record.gateway_address)
                if self._started:
                    await replica.client.start()
                log.info("discovered replica %s at %s in redis", replica_id, record.gateway_address)
            replica.record = record

    async def _forget_dead(self, known: list[Replica]) -> None:
        """Drop replicas discovered in Redis that are long dead (`_FORGET_AFTER_S`):
        without this, every replica that ever registered would stay listed, with a socket
        reconnecting to it, for the gateway's lifetime."""
        now = time.time()
        for replica in known:
            record = replica.record
            if (
                record is None or self.replicas.get(replica.address) is not replica or replica.address in self._configured or replica.client.connected
                or replica.num_in_flight > 0 or now - record.heartbeat_at <= _FORGET_AFTER_S
            ):
                continue
            del self.replicas[replica.address]
            self._recent.forget(replica.address)
            self._stale_ids[record.replica_id] = time.monotonic() + _STALE_HEARTBEAT_S
            await replica.client.close()
            log.warning(
                "forgot replica %s at %s: disconnected, no heartbeat for %.0f s", record.replica_id, replica.address,
                now - record.heartbeat_at,
            )

    def _clear_failure(self, replica: Replica) -> None:
        record = replica.record
        if replica.failed_at is not None and record is not None and record.heartbeat_at > replica.failed_at and record.num_executors_alive > 0:
            replica.failed_at = None

    # -- bookkeeping -----------------------------------------------------------------------

    def request_ended(self, replica: Replica, block_hashes: Sequence[BlockHash]) -> None:
        """A request routed there ended: its blocks are there now, and Redis will say so
        within a second or so; until then this gateway remembers it."""
        self._recent.record(replica.address, block_hashes, time.monotonic())

    def mark_failed(self, replica: Replica) -> None:
        """It answered a request with a 503 or lost its connection mid-request: no new
        request goes there until it shows a live executor (or reconnects)."""
        if replica.failed_at is None:
            log.warning("replica %s at %s failed: routing around it", replica.replica_id, replica.address)
        replica.failed_at = time.time()
        replica.failed_connects = replica.client.num_connects
        self._recent.forget(replica.address)


def _shape(replica: Replica) -> tuple[str, int] | None:
    """(model, block size) that its block hashes depend on, once it reported them."""
    record = replica.record
    if record is None or not record.model or record.block_size <= 0:
        return None
    return (record.model, record.block_size)
