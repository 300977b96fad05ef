"""What the gateway tests show against the fake scheduler, on real processes (redis-server,
scheduler, executor with the embedded model, gateway): a full waiting queue is a 429, a
request's deadline passing with nothing generated is a 504 and an abort at the scheduler,
and a scheduler that stops answering is found by the stall check: a 503.

One request slot (`--max-num-seqs 1`) and one waiting place (`--max-num-waiting 1`): a
stream held open by the test occupies the slot for as long as the test wants (8,000
tokens: over a minute of decoding, while each test needs seconds), so which request runs, waits
or is refused is decided by the test, not by timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cluster import Cluster, wait_until
from tests.gateway.test_validation import assert_openai_error

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-limits"
STALL_TIMEOUT_S = 2.0
PROMPT = "The history of the bicycle begins"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(
        tmp_path_factory.mktemp("limits"), admin_key=ADMIN_KEY,
        extra_scheduler_flags=["--max-num-seqs", "1", "--max-num-waiting", "1"],
        extra_gateway_flags=["--stall-timeout", str(STALL_TIMEOUT_S)],
    )
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def admin(cluster: Cluster) -> dict[str, Any]:
    response = httpx.get(f"{cluster.base_url}/admin/scheduler", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def idle(cluster: Cluster) -> bool:
    snapshot = admin(cluster)
    pool = snapshot["block_pool"]
    return not snapshot["running"] and not snapshot["waiting"] and pool["num_used_blocks"] == 0


@contextlib.contextmanager
def held_stream(cluster: Cluster, max_tokens: int) -> Iterator[None]:
    """A streaming request that lasts until the block ends (its client then leaves and the
    gateway aborts it), told apart in the scheduler's queues by its `max_tokens`. On a raw
    socket: a request still waiting has no response yet, and none is awaited here."""
    payload = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=120) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        yield


def completion(cluster: Cluster, **fields: Any) -> httpx.Response:
    return httpx.post(f"{cluster.base_url}/v1/completions", json={"prompt": PROMPT, **fields}, timeout=120)


def test_a_full_waiting_queue_is_a_429_with_retry_after(cluster: Cluster) -> None:
    with held_stream(cluster, 8001):
        wait_until(lambda: [r["max_tokens"] for r in admin(cluster)["running"]] == [8001], 60, "the slot taken")
        with held_stream(cluster, 8002):
            wait_until(lambda: [r["max_tokens"] for r in admin(cluster)["waiting"]] == [8002], 60, "the waiting place taken")
            refused = completion(cluster, max_tokens=4)
            error = assert_openai_error(refused, 429)
            assert error["type"] == "rate_limit_error" and "waiting" in error["message"]
            assert float(refused.headers["retry-after"]) > 0
    wait_until(lambda: idle(cluster), 60, "both held requests aborted, every block free")


def test_a_deadline_passing_in_the_queue_is_a_504_and_an_abort_at_the_scheduler(cluster: Cluster) -> None:
    with held_stream(cluster, 8003):
        wait_until(lambda: [r["max_tokens"] for r in admin(cluster)["running"]] == [8003], 60, "the slot taken")
        # Waits behind the held stream: nothing generated when its 1 s deadline passes.
        timed_out = completion(cluster, max_tokens=7, timeout=1)
        assert_openai_error(timed_out, 504, code="timeout")
        # Aborted at the scheduler, not only answered: it leaves the queue while the held
        # stream still runs.
        wait_until(lambda: all(r["max_tokens"] != 7 for r in admin(cluster)["waiting"]), 30, "the abort")
        assert [r["max_tokens"] for r in admin(cluster)["running"]] == [8003]
    wait_until(lambda: idle(cluster), 60, "every block free")


def test_a_scheduler_that_stops_answering_is_found_by_the_stall_check(cluster: Cluster) -> None:
    """SIGSTOP keeps the scheduler's sockets open (no lost connection to notice): only the
    stall check can tell that nothing comes. It asks the scheduler, gets no answer, 503."""
    scheduler = cluster.services["scheduler"]
    assert scheduler.process is not None
    os.kill(scheduler.process.pid, signal.SIGSTOP)
    try:
        stalled = completion(cluster, max_tokens=4)
        error = assert_openai_error(stalled, 503, code="service_unavailable")
        assert "stopped answering" in error["message"] and f"{STALL_TIMEOUT_S:g} s" in error["message"]
    finally:
        os.kill(scheduler.process.pid, signal.SIGCONT)
    # Back: it serves again (an executor it judged silent meanwhile rejoins by itself).
    wait_until(lambda: completion(cluster, max_tokens=3).status_code == 200, 120, "the scheduler serving again", interval_s=0.5)
    wait_until(lambda: idle(cluster), 60, "every block free")
