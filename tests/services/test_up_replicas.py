"""`pagedserve up --replicas 2 --zmq-curve-keys DIR` as a user starts it: a local
redis-server, two schedulers each with an executor, a gateway, every ZeroMQ link between
these real processes CURVE-secured; and routing while Redis does not answer.

The model is a tiny random Llama folder (it loads in a moment: what is under test is the
processes and their links, not the model).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pagedserve.services.gateway.scheduler_client import SchedulerClient
from pagedserve.shared.zmq_security import CurveEndpoint, curve_client
from tests.cluster import Up, save_random_gqa_llama, wait_until

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-up-replicas"


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("curve-keys")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, keys_dir: Path) -> Iterator[Up]:
    workdir = tmp_path_factory.mktemp("up-replicas")
    model = workdir / "random-gqa-llama"
    save_random_gqa_llama(model)
    launcher = Up(workdir, ["--replicas", "2", "--zmq-curve-keys", str(keys_dir), "--model", str(model),
                            "--kv-cache-memory", str(16 << 20)], admin_key=ADMIN_KEY)
    try:
        launcher.wait_healthy()
        yield launcher
    finally:
        launcher.stop()


def complete(up: Up, prompt: str) -> httpx.Response:
    return httpx.post(f"{up.base_url}/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}, timeout=120)


def replicas(up: Up) -> list[dict]:
    return httpx.get(f"{up.base_url}/health", timeout=30).json()["replicas"]


def test_two_replicas_serve_over_curve_links(up: Up, keys_dir: Path) -> None:
    wait_until(lambda: len(replicas(up)) == 2 and all(r["scheduler"] == "ok" for r in replicas(up)), 120, "both replicas ok")
    assert {r["replica_id"] for r in replicas(up)} == {"replica-0", "replica-1"}
    assert any(keys_dir.iterdir()), "up generated no CURVE keys"
    for i in range(4):
        response = complete(up, f"Request {i} of four:")
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4, response.text

    # The links are CURVE: a client without the keys gets no handshake from a scheduler.
    address = re.search(r"--gateway-address (\S+)", up.command_of("scheduler-0")).group(1)

    async def connects(curve: CurveEndpoint | None, timeout_s: float) -> bool:
        client = SchedulerClient(address, "gw-test", curve=curve)
        await client.start()
        try:
            return await client.wait_connected(timeout_s)
        finally:
            await client.close()

    assert asyncio.run(connects(curve_client(keys_dir), 60.0)) is True  # the address is right...
    assert asyncio.run(connects(None, 3.0)) is False  # ...and plain ZeroMQ gets no handshake there (an absence: only a timeout shows it)


def test_routing_goes_on_while_redis_does_not_answer(up: Up) -> None:
    redis_pid = up.pid_of("redis")
    os.kill(redis_pid, signal.SIGSTOP)  # alive, silent: every Redis call times out
    try:
        for i in range(3):
            response = complete(up, f"While Redis sleeps, request {i}:")
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4, response.text
        health = httpx.get(f"{up.base_url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["redis"] == "degraded" and health.json()["status"] == "degraded"
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    wait_until(lambda: httpx.get(f"{up.base_url}/health", timeout=30).json()["redis"] == "ok", 60, "redis ok again")
