"""RedisMirror (services/scheduler/redis_mirror.py) against a real redis-server: request
hashes, and the sorted set of this replica's cached prefixes kept equal to the pool's."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from services.launcher import free_port, redis_server_binary
from services.scheduler.prefix_cache import PrefixCacheEvent
from services.scheduler.redis_mirror import RedisMirror, prefix_cache_key
from services.scheduler.request import Request
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler
from shared.sampling_params import SamplingParams
from tests.cluster import port_open, wait_until
from tests.scheduler.test_scheduler import FakeExecutor, Run, run_to_completion


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


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
    # unfinished_tasks drops only after the batch holding an update has been written.
    wait_until(lambda: mirror.pending.unfinished_tasks == 0, 5, "the mirror's queued updates to be written")


def test_request_fields_are_still_mirrored(mirror: RedisMirror) -> None:
    mirror.update("req:test-hash", {"status": "finished", "tokens": 3}, expire=True)
    settle(mirror)
    client = client_of(mirror)
    assert client.hgetall("req:test-hash") == {"status": "finished", "tokens": "3"}
    assert 0 < client.ttl("req:test-hash") <= 24 * 3600


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
        SchedulerConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, model="m"),
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
