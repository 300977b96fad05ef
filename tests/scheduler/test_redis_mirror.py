"""RedisMirror (services/scheduler/redis_mirror.py) against a real redis-server: the
replica's hash, the sorted set of its cached prefixes kept equal to the pool's, and
updates buffered while Redis is down and written once it is back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from pagedserve.services.launcher import free_port, redis_server_binary
from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.prefix_cache import PrefixCacheEvent
from pagedserve.services.scheduler.redis_mirror import RedisMirror, prefix_cache_key, replica_key
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.cluster import port_open, wait_until
from tests.scheduler.test_scheduler import FakeExecutor, Run, run_to_completion


def start_redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: port_open(port), 10, "redis-server")
    return proc


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = start_redis(port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(proc)


@pytest.fixture
def mirror(redis_url: str, request: pytest.FixtureRequest) -> Iterator[RedisMirror]:
    mirror = RedisMirror(redis_url, replica_id=request.node.name)
    try:
        yield mirror
    finally:
        mirror.close()


def client_of(mirror: RedisMirror) -> redis.Redis:
    kwargs = mirror.client.connection_pool.connection_kwargs
    return redis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0), decode_responses=True)


def prefix_set(mirror: RedisMirror) -> dict[str, float]:
    return dict(client_of(mirror).zrange(prefix_cache_key(mirror.replica_id), 0, -1, withscores=True))


def settle(mirror: RedisMirror) -> None:
    assert mirror.wait_written(5), "the mirror's buffered updates were not written within 5 s"


def test_replica_fields_merge_into_its_hash_and_no_request_record_is_written(mirror: RedisMirror) -> None:
    mirror.update_replica({"num_running": 1, "num_waiting": 4})
    mirror.update_replica({"num_running": 2, "gateway_address": "tcp://127.0.0.1:5555"})
    settle(mirror)
    client = client_of(mirror)
    assert client.hgetall(replica_key(mirror.replica_id)) == {
        "num_running": "2", "num_waiting": "4", "gateway_address": "tcp://127.0.0.1:5555",
    }
    assert client.ttl(replica_key(mirror.replica_id)) == -1  # the replica's own key: no request TTL
    # Request records are the gateway's: the scheduler's mirror writes none.
    assert client.keys("req:*") == []


def test_prefix_events_become_a_sorted_set_by_last_use(mirror: RedisMirror) -> None:
    before = time.time()
    mirror.update_prefix_cache([
        PrefixCacheEvent(b"\x01", stored=True),
        PrefixCacheEvent(b"\x02", stored=True),
        PrefixCacheEvent(b"\x01", stored=False),  # evicted after: gone
        PrefixCacheEvent(b"\x03", stored=False),
        PrefixCacheEvent(b"\x03", stored=True),  # evicted, then cached again: there
    ])
    settle(mirror)
    members = prefix_set(mirror)
    assert set(members) == {"02", "03"}
    assert all(before <= score <= time.time() for score in members.values())
    mirror.update_prefix_cache([PrefixCacheEvent(b"\x02", stored=False)])
    settle(mirror)
    assert set(prefix_set(mirror)) == {"03"}
    mirror.clear_prefix_cache()
    settle(mirror)
    assert prefix_set(mirror) == {}


def test_mirrored_set_equals_the_pool_after_hits_and_evictions(mirror: RedisMirror) -> None:
    sched = Scheduler(
        SchedulerConfig(limits=SchedulingLimits(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32), model="m"),
        num_blocks=12,
        block_size=4,
        record_prefix_cache_events=True,
    )
    executor, run = FakeExecutor(4), Run()
    system = list(range(100, 120))
    all_events: list[PrefixCacheEvent] = []
    for i in range(12):
        prompt = system[: 4 + 4 * (i % 4)] + [200 + i] * (i % 5)
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=6), arrival_time=float(i)))
        if i % 3 == 2:
            run_to_completion(sched, executor, run)
            events = sched.take_prefix_cache_events()
            mirror.update_prefix_cache(events)
            all_events += events
    settle(mirror)
    pool = sched.block_pool
    assert sched.prefix_cache_stats.num_hits > 0
    assert any(not e.stored for e in all_events), "no eviction: the pool is too roomy for this test"
    cached = {pool.block_hash(b) for b in range(pool.num_blocks)} - {None}
    assert len(cached) == pool.num_hashed_blocks > 0
    assert set(prefix_set(mirror)) == {h.hex() for h in cached if h is not None}


def test_updates_made_while_redis_is_down_are_written_once_it_is_back() -> None:
    port = free_port()
    proc = start_redis(port)
    mirror = RedisMirror(f"redis://127.0.0.1:{port}/0", replica_id="restarted")
    client = client_of(mirror)
    try:
        mirror.update_replica({"num_running": 1, "num_blocks": 64})
        mirror.update_prefix_cache([PrefixCacheEvent(b"\x01", stored=True), PrefixCacheEvent(b"\x02", stored=True)])
        settle(mirror)
        assert set(prefix_set(mirror)) == {"01", "02"}

        stop_redis(proc)
        mirror.update_replica({"num_running": 3})
        wait_until(lambda: not mirror.healthy, 10, "the mirror's first failed write")
        mirror.update_replica({"num_waiting": 5})  # merged with the failed write, newer wins
        mirror.update_prefix_cache([
            PrefixCacheEvent(b"\x01", stored=False),
            PrefixCacheEvent(b"\x03", stored=True),
            PrefixCacheEvent(b"\x04", stored=True),
            PrefixCacheEvent(b"\x04", stored=False),
        ])
        assert not mirror.wait_written(0.3)  # nothing to write to: still buffered

        proc = start_redis(port)  # an empty server: only what was buffered comes back
        settle(mirror)
        assert mirror.healthy and mirror.num_dropped == 0
        assert client.hgetall(replica_key("restarted")) == {"num_running": "3", "num_waiting": "5"}
        assert set(prefix_set(mirror)) == {"03"}
    finally:
        mirror.close()
        client.close()
        stop_redis(proc)


def test_the_buffer_is_bounded_while_redis_is_down() -> None:
    mirror = RedisMirror(f"redis://127.0.0.1:{free_port()}/0", replica_id="bounded", max_buffered_prefixes=3)
    try:
        mirror.update_replica({"num_running": 1})
        wait_until(lambda: not mirror.healthy, 10, "the mirror's first failed write")
        events = [PrefixCacheEvent(bytes([i]), stored=True) for i in range(5)]
        mirror.update_prefix_cache(events)
        assert mirror.num_dropped == 2
        # A change to a member already buffered still counts: it takes no more room.
        mirror.update_prefix_cache([PrefixCacheEvent(bytes([0]), stored=False)])
        assert mirror.num_dropped == 2
    finally:
        mirror.close()
