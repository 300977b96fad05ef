"""A Redis that restarts empty (issue #26) gets this replica's whole prefix set back: the
scheduler notices the new server (its run_id) and rewrites every cached block's hash,
instead of routing finding nothing there until each block happens to be stored again.
A real redis-server, restarted on its port; the scheduler service over real ZeroMQ
sockets with test_service.py's fake executor."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
import redis

from pagedserve.services.launcher import free_port, redis_server_binary
from tests.cluster import wait_until
from tests.scheduler.test_service import (  # noqa: F401  (start_service is a fixture)
    Service,
    drive,
    executor_joined,
    start_service,
)


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis.from_url(self.url, decode_responses=True)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, "redis-server")

    def answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    server.client.close()


def test_a_redis_restarted_empty_gets_the_whole_prefix_set_back(
    start_service: Callable[..., Service], redis_server: RedisServer
) -> None:
    service = start_service(heartbeat_timeout_s=5.0, redis_url=redis_server.url)
    executor = service.executor("first")
    wait_until(lambda: executor_joined(service, "first"), 5, "the executor to join")
    service.gateway.submit("a")
    service.gateway.submit("b")
    drive(service, executor, lambda g: len(g.finished) == 2)
    store = redis_server.client
    # Finished requests leave their full blocks cached: they reach Redis within a report.
    wait_until(lambda: store.zcard("prefix:replica-0") >= 3, 10, "the cached prefixes in redis")
    cached = set(store.zrange("prefix:replica-0", 0, -1))

    redis_server.stop()
    redis_server.start()  # a new server, empty
    assert store.zcard("prefix:replica-0") == 0
    # Nothing runs, so no block is stored again: only a resync brings the set back.
    wait_until(lambda: set(store.zrange("prefix:replica-0", 0, -1)) == cached, 20, "the prefix set resynchronised")
