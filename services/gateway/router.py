"""Which replica serves a request: the pure scoring policy, no sockets and no Redis.

A replica that already holds the K/V of a prompt's leading blocks skips computing them,
so the gateway sends each request where the longest chain of its full blocks is cached
(`prefix:{replica}` in Redis, hashed with `shared/block_hashing.py`, the scheduler's own
function), discounted by how busy the replica is:

    score = cached_tokens - load_penalty_tokens * load

`cached_tokens` is the longest chain present times the block size (a chain, not a count:
block k's K/V is only usable when blocks 0..k-1 are too); `load` is the requests running
or waiting there. The default penalty, 32 tokens a request, keeps a tenant whose 1k-token
prefix is cached on its replica until that replica has 32 more requests than another
(SGLang's router switches from cache affinity to load balancing at about the same
imbalance, 32 requests): under continuous batching one more running request costs little,
while recomputing a long prefix costs a whole prefill. A short cached prefix gives way
sooner (100 tokens: at 3 more requests). Equal scores go to the least loaded replica; equal loads
to the replica holding fewer cached blocks in all (a new tenant goes where there is room
for its prefix, so the tenants' working sets split over the replicas' caches), then to a
pseudo-random but stable choice keyed by the prompt's first block (rendezvous hashing),
so that tenants nobody has cached yet spread instead of all landing on the first.

`round_robin` is the baseline that ignores all of it (benchmarks/routing.py measures both).

Redis learns of a new cached block about a second after it is computed; a tenant's
second request arriving sooner would find nothing. `RecentRoutes` is the gateway's own
memory of where it just sent which blocks, trusted for a few seconds after the request
was routed or ended (its prefill may take longer than that), until Redis knows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.shared.block_hashing import BlockHash

DEFAULT_LOAD_PENALTY_TOKENS = 32
_RECENT_ROUTE_TTL_S = 5.0
_MAX_RECENT_BLOCKS = 100_000


@dataclass(frozen=True)
class Candidate:
    """One routable replica as the router sees it."""

    key: str  # the replica's address: unique, stable
    load: int  # requests running + waiting (what a new request queues behind)
    num_cached_blocks: int  # the longest chain of the prompt's full blocks it holds
    block_size: int
    num_blocks_cached_total: int = 0  # every block in its prefix set (how full its cache is)


@dataclass(frozen=True)
class RoutingDecision:
    key: str
    num_cached_blocks: int  # what the chosen replica is expected to reuse
    reason: str  # "prefix": a cached chain won; "least_loaded": no replica held any of it


def longest_chain(present: Sequence[bool]) -> int:
    """How many leading blocks are present (block k counts only if 0..k-1 do)."""
    for index, hit in enumerate(present):
        if not hit:
            return index
    return len(present)


def choose(candidates: Sequence[Candidate], spread_key: bytes, load_penalty_tokens: int = DEFAULT_LOAD_PENALTY_TOKENS) -> RoutingDecision:
    """The best candidate (there must be one). `spread_key` orders equally good ones."""
    assert candidates, "choose() needs at least one candidate"

    def rank(c: Candidate) -> tuple[int, int, int, bytes]:
        score = c.num_cached_blocks * c.block_size - load_penalty_tokens * c.load
        return (score, -c.load, -c.num_blocks_cached_total, hashlib.sha256(spread_key + c.key.encode()).digest())

    best = max(candidates, key=rank)
    reason = "prefix" if best.num_cached_blocks > 0 else "least_loaded"
    return RoutingDecision(best.key, best.num_cached_blocks, reason)


class RoundRobin:
    """The cache-blind baseline: each replica in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Candidate]) -> RoutingDecision:
        ordered = sorted(candidates, key=lambda c: c.key)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return RoutingDecision(chosen.key, chosen.num_cached_blocks, "round_robin")


class RecentRoutes:
    """Block hash -> (replica key, when it was sent there), for the few seconds before the
    replica's Redis mirror reports the blocks. Bounded: the oldest are forgotten first."""

    def __init__(self, ttl_s: float = _RECENT_ROUTE_TTL_S, max_blocks: int = _MAX_RECENT_BLOCKS) -> None:
        self._ttl_s = ttl_s
        self._max_blocks = max_blocks
        self._routes: OrderedDict[BlockHash, tuple[str, float]] = OrderedDict()

    def record(self, key: str, block_hashes: Sequence[BlockHash], now: float) -> None:
        for block_hash in block_hashes:
            self._routes[block_hash] = (key, now)
            self._routes.move_to_end(block_hash)
        while len(self._routes) > self._max_blocks:
            self._routes.popitem(last=False)

    def longest_chain(self, key: str, block_hashes: Sequence[BlockHash], now: float) -> int:
        present = []
        for block_hash in block_hashes:
            route = self._routes.get(block_hash)
            present.append(route is not None and route[0] == key and now - route[1] <= self._ttl_s)
        return longest_chain(present)

    def forget(self, key: str) -> None:
        """A replica went away: nothing it held is there any more."""
        for block_hash in [h for h, (k, _) in self._routes.items() if k == key]:
            del self._routes[block_hash]
