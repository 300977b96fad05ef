"""The routing policy (services/gateway/router.py), pure: longest cached chain minus a
load penalty, ties to the least loaded, tenants with nothing cached spread and sticky,
and the gateway's memory of where it just sent which blocks."""

from __future__ import annotations

from pagedserve.services.gateway.router import Candidate, RecentRoutes, RoundRobin, choose, longest_chain
from pagedserve.shared.block_hashing import prompt_block_hashes


def test_longest_chain_counts_only_leading_blocks() -> None:
    assert longest_chain([]) == 0
    assert longest_chain([True, True, False, True]) == 2
    assert longest_chain([False, True, True]) == 0
    assert longest_chain([True, True, True]) == 3


def test_the_longest_cached_chain_wins_until_the_load_outweighs_it() -> None:
    cached = Candidate("a", load=2, num_cached_blocks=64, block_size=16)  # 1,024 tokens cached
    idle = Candidate("b", load=0, num_cached_blocks=0, block_size=16)
    decision = choose([cached, idle], b"tenant", load_penalty_tokens=256)
    assert (decision.key, decision.reason, decision.num_cached_blocks) == ("a", "prefix", 64)
    # 1,024 - 5 x 256 < 0: five requests queued there cost more than recomputing the prefix.
    busy = Candidate("a", load=5, num_cached_blocks=64, block_size=16)
    assert choose([busy, idle], b"tenant", load_penalty_tokens=256).key == "b"
    # A longer chain beats a shorter one at equal load.
    short = Candidate("b", load=0, num_cached_blocks=10, block_size=16)
    long = Candidate("a", load=0, num_cached_blocks=11, block_size=16)
    assert choose([short, long], b"x").key == "a"


def test_equal_scores_go_to_the_least_loaded() -> None:
    # Both score 0 - 256 * load, the first lower: but penalty 0 makes the scores equal.
    a = Candidate("a", load=3, num_cached_blocks=0, block_size=16)
    b = Candidate("b", load=1, num_cached_blocks=0, block_size=16)
    decision = choose([a, b], b"k", load_penalty_tokens=0)
    assert (decision.key, decision.reason) == ("b", "least_loaded")


def test_tenants_with_nothing_cached_spread_and_each_sticks_to_one_replica() -> None:
    replicas = [Candidate(key, 0, 0, 16) for key in ("tcp://r0:5555", "tcp://r1:5555")]
    keys = [f"tenant-{i}".encode() for i in range(32)]
    chosen = [choose(replicas, key).key for key in keys]
    assert 8 <= chosen.count("tcp://r0:5555") <= 24  # spread, not all on the first
    assert chosen == [choose(list(reversed(replicas)), key).key for key in keys]  # stable, whatever the order


def test_recent_routes_bridge_the_mirror_delay_and_expire() -> None:
    hashes = prompt_block_hashes(list(range(100)), 16, "m")
    assert len(hashes) == 6
    recent = RecentRoutes(ttl_s=5.0, max_blocks=1000)
    recent.record("a", hashes[:4], now=100.0)
    assert recent.longest_chain("a", hashes, now=101.0) == 4
    assert recent.longest_chain("b", hashes, now=101.0) == 0
    assert recent.longest_chain("a", hashes, now=106.0) == 0  # by then Redis knows the truth
    recent.record("a", hashes, now=110.0)
    recent.forget("a")
    assert recent.longest_chain("a", hashes, now=110.0) == 0


def test_recent_routes_are_bounded() -> None:
    recent = RecentRoutes(ttl_s=5.0, max_blocks=3)
    hashes = prompt_block_hashes(list(range(80)), 16, "m")
    recent.record("a", hashes, now=0.0)
    assert recent.longest_chain("a", hashes, now=0.0) == 0  # the oldest (leading) blocks went first
    assert recent.longest_chain("a", hashes[2:], now=0.0) == 3


def test_a_new_tenant_goes_where_the_cache_has_room() -> None:
    full = Candidate("a", load=0, num_cached_blocks=0, block_size=16, num_blocks_cached_total=300)
    roomy = Candidate("b", load=0, num_cached_blocks=0, block_size=16, num_blocks_cached_total=40)
    assert all(choose([full, roomy], f"tenant-{i}".encode()).key == "b" for i in range(8))


def test_round_robin_takes_each_replica_in_turn_whatever_is_cached() -> None:
    policy = RoundRobin()
    replicas = [Candidate("b", 0, 0, 16), Candidate("a", 5, 64, 16)]
    decisions = [policy.choose(replicas) for _ in range(4)]
    assert [d.key for d in decisions] == ["a", "b", "a", "b"] and {d.reason for d in decisions} == {"round_robin"}
