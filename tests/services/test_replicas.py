"""Two replicas behind one gateway, on real processes (redis-server, two schedulers with
an executor each running the embedded model in float64, the gateway, and a second
gateway that dies), asserting what clients see and that no KV block leaks:

- registration: both replicas in Redis with load, heartbeat, model and block size; the
  gateway lists both in /health, /admin/scheduler and /metrics;
- routing by cached prefix: a tenant's requests land where its prefix is cached and hit;
- a gateway SIGKILLed mid-stream: its scheduler notices within a few seconds and aborts
  its request, freeing the blocks;
- a replica's scheduler SIGKILLed mid-stream: every stream completes with exactly the
  text of an undisturbed run, nothing repeated, nothing missing; the survivor ends with
  every block free; new requests go to the survivor at once.

float64 because a resumed stream recomputes its tokens in one prefill, which in float32
could flip a near-tie that decoding token by token did not (NOTES: exactness).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from pagedserve.services.launcher import free_port, pagedserve_command, redis_server_binary
from tests.cluster import ServiceProcess, port_open, wait_until

pytestmark = pytest.mark.slow

GATEWAY_TIMEOUT_S = 4.0
TENANT_PREFIX = "You are the support assistant of the Acme bicycle shop. Answer briefly. " * 6  # ~100 tokens


class ReplicaCluster:
    """redis + R x (scheduler + executor) + a gateway that knows every replica's address."""

    def __init__(self, workdir: Path, num_replicas: int = 2) -> None:
        self.workdir = workdir
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.gateway_zmq = [f"tcp://127.0.0.1:{free_port()}" for _ in range(num_replicas)]
        self.executor_zmq = [f"tcp://127.0.0.1:{free_port()}" for _ in range(num_replicas)]
        self.http_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.services: dict[str, ServiceProcess] = {}

    def start_service(self, name: str, command: list[str]) -> ServiceProcess:
        service = self.services[name] = ServiceProcess(name, command, self.workdir / f"{name}.log", self.env)
        service.start()
        return service

    def start(self) -> ReplicaCluster:
        base = pagedserve_command()
        self.start_service("redis", [redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        wait_until(lambda: port_open(self.redis_port), 10, "redis-server")
        for index, (gateway_zmq, executor_zmq) in enumerate(zip(self.gateway_zmq, self.executor_zmq)):
            self.start_service(f"scheduler-{index}", base + [
                "scheduler", "--gateway-address", gateway_zmq, "--executor-address", executor_zmq, "--redis-url", self.redis_url,
                "--replica-id", f"replica-{index}", "--gateway-timeout", str(GATEWAY_TIMEOUT_S), "--max-num-batched-tokens", "256",
            ])
            self.start_service(f"executor-{index}", base + [
                "executor", "--scheduler-address", executor_zmq, "--dtype", "float64", "--num-kv-blocks", "64",
                "--executor-id", f"executor-{index}",
            ])
        self.start_gateway("gateway", self.http_port)
        self.wait_healthy(self.base_url, num_replicas=len(self.gateway_zmq))
        return self

    def start_gateway(self, name: str, port: int) -> None:
        self.start_service(name, pagedserve_command() + [
            "gateway", "--host", "127.0.0.1", "--port", str(port), "--scheduler-address", ",".join(self.gateway_zmq),
            "--redis-url", self.redis_url,
        ])

    def wait_healthy(self, url: str, num_replicas: int) -> None:
        def healthy() -> bool:
            for service in self.services.values():
                if not service.alive():
                    raise RuntimeError(f"{service.name} died during start-up:\n{service.log()}")
            try:
                body = httpx.get(f"{url}/health", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return sum(r["scheduler"] == "ok" for r in body.get("replicas", [])) == num_replicas

        wait_until(healthy, 240, f"{num_replicas} healthy replicas behind {url}", interval_s=0.25)

    def stop(self) -> None:
        for name in sorted(self.services, key=lambda n: ("gateway", "executor", "scheduler", "redis").index(n.split("-")[0])):
            self.services[name].stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaCluster]:
    cluster = ReplicaCluster(tmp_path_factory.mktemp("replicas"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def admin(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/admin/scheduler", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def replica_snapshot(url: str, replica_id: str) -> dict[str, Any] | None:
    return next(r["snapshot"] for r in admin(url)["replicas"] if r["replica_id"] == replica_id)


def idle_and_all_blocks_free(url: str, replica_id: str) -> bool:
    snapshot = replica_snapshot(url, replica_id)
    assert snapshot is not None
    pool = snapshot["block_pool"]
    return not snapshot["running"] and not snapshot["waiting"] and pool["num_free_blocks"] == pool["num_blocks"] and pool["num_used_blocks"] == 0


def completion(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


class Streamer:
    """A greedy streamed completion on its own thread: text, usage, errors, the id."""

    def __init__(self, url: str, prompt: str, max_tokens: int) -> None:
        self.body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True}}
        self.url = url
        self.text = ""
        self.id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.errors: list[Any] = []
        self.num_chunks = 0
        self.done = False
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=300) as response:
                if response.status_code != 200:
                    self.errors.append(response.read().decode())
                    return
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.errors.append(event["error"])
                            continue
                        self.id = event["id"]
                        self.usage = event.get("usage") or self.usage
                        for choice in event["choices"]:
                            self.text += choice["text"]
                            self.num_chunks += 1
        except httpx.HTTPError as error:  # a gateway killed under it
            self.errors.append(repr(error))

    def join(self, timeout_s: float = 240) -> Streamer:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream neither completed nor failed"
        return self


def replica_of(store: redis.Redis, completion_id: str) -> str:
    key = f"req:{completion_id}-0"
    wait_until(lambda: store.hget(key, "replica_id") is not None, 10, f"the record of {completion_id}")
    return store.hget(key, "replica_id")


def test_replicas_register_and_requests_route_to_their_cached_prefix(cluster: ReplicaCluster) -> None:
    store = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    assert store.smembers("replicas") == {"replica-0", "replica-1"}
    for index in range(2):
        # Reported once a second: the executor may have joined after the last report.
        wait_until(lambda: store.hget(f"replica:replica-{index}", "num_executors_alive") == "1", 5, "a report with the executor")
        record = store.hgetall(f"replica:replica-{index}")
        assert record["gateway_address"] == cluster.gateway_zmq[index]
        assert int(record["block_size"]) == 16 and record["model"] and int(record["num_executors_alive"]) == 1
        assert time.time() - float(record["heartbeat_at"]) < 5

    # A tenant's second request goes where the first left its prefix, and hits it.
    first = completion(cluster.base_url, TENANT_PREFIX + "Where is the shop?", 2)
    second = completion(cluster.base_url, TENANT_PREFIX + "When does it open?", 2)
    assert replica_of(store, second["id"]) == replica_of(store, first["id"])
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 80

    health = httpx.get(f"{cluster.base_url}/health", timeout=5).json()
    assert health["status"] == "ok" and sorted(r["replica_id"] for r in health["replicas"]) == ["replica-0", "replica-1"]
    listed = admin(cluster.base_url)["replicas"]
    assert sorted(r["replica_id"] for r in listed) == ["replica-0", "replica-1"]
    assert all(r["snapshot"]["block_pool"]["num_blocks"] == 64 for r in listed)
    metrics = httpx.get(f"{cluster.base_url}/metrics", timeout=5).text
    assert f'pagedserve_routing_decisions_total{{model="{first["model"]}",reason="prefix",replica="{replica_of(store, first["id"])}"}}' in metrics
    assert 'pagedserve_replica_up{' in metrics and metrics.count("pagedserve_replica_up{") == 2
    store.close()


def test_a_dead_gateway_has_its_requests_aborted_by_the_scheduler(cluster: ReplicaCluster) -> None:
    port = free_port()
    cluster.start_gateway("gateway-doomed", port)
    doomed_url = f"http://127.0.0.1:{port}"
    cluster.wait_healthy(doomed_url, num_replicas=2)
    streamer = Streamer(doomed_url, "The history of the bicycle begins", max_tokens=600)
    wait_until(lambda: streamer.num_chunks >= 2 or not streamer.thread.is_alive(), 60, "the doomed gateway streaming")
    assert streamer.id is not None, streamer.errors
    store = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    replica_id = replica_of(store, streamer.id)
    assert not idle_and_all_blocks_free(cluster.base_url, replica_id)
    doomed = cluster.services["gateway-doomed"]
    assert doomed.process is not None
    os.kill(doomed.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: idle_and_all_blocks_free(cluster.base_url, replica_id), 15, "the dead gateway's request aborted", interval_s=0.2)
    assert time.monotonic() - killed_at < GATEWAY_TIMEOUT_S + 4
    doomed.stop()
    streamer.join(30)
    store.close()


def test_a_replica_killed_mid_stream_is_continued_on_the_other_exactly(cluster: ReplicaCluster) -> None:
    prompts = [f"{TENANT_PREFIX} Question {i}: what should I ride to work?" for i in range(2)]
    max_tokens = 24
    undisturbed = [Streamer(cluster.base_url, p, max_tokens) for p in prompts]
    for streamer in undisturbed:
        streamer.join()
        assert not streamer.errors and streamer.done and streamer.usage["completion_tokens"] == max_tokens

    streams = [Streamer(cluster.base_url, p, max_tokens) for p in prompts]
    wait_until(lambda: all(s.num_chunks >= 4 for s in streams), 120, "every stream under way", interval_s=0.02)
    store = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    victim = replica_of(store, streams[0].id or "")
    survivor = "replica-1" if victim == "replica-0" else "replica-0"
    scheduler = cluster.services[f"scheduler-{victim.split('-')[1]}"]
    assert scheduler.process is not None
    os.kill(scheduler.process.pid, signal.SIGKILL)

    for streamer, reference in zip(streams, undisturbed):
        streamer.join()
        assert not streamer.errors, streamer.errors
        assert streamer.done and streamer.text == reference.text  # no token repeated, none missing
        assert streamer.usage["completion_tokens"] == max_tokens
    wait_until(lambda: store.hget(f"req:{streams[0].id}-0", "status") == "failed_over", 10, "the failed-over record")
    # The survivor held the resumed streams and freed every block.
    wait_until(lambda: idle_and_all_blocks_free(cluster.base_url, survivor), 10, "every block free on the survivor", interval_s=0.2)
    health = httpx.get(f"{cluster.base_url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    after = completion(cluster.base_url, "A new request after the failover", 3)
    assert replica_of(store, after["id"]) == survivor
    assert "pagedserve_failovers_total" in httpx.get(f"{cluster.base_url}/metrics", timeout=5).text
    scheduler.stop()
    store.close()
