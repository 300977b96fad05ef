"""`pagedserve up` under faults with load: 64 concurrent streaming clients, a random third
of them leaving midway, and the executor SIGKILLed in the middle; `up`'s supervisor
restarts it. Every client that stays sees its stream complete (or, at worst, end with a
clear error event), the server is healthy afterwards and holds no request and no block.
Then the scheduler is SIGKILLed: `up` restarts it, the executor announces itself to the new
one, the gateway reconnects, and serving resumes. SIGTERM still stops everything cleanly.

Bounded for CI: short prompts, 12 tokens each; most of the time is the executor reloading
the model after the kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pagedserve.services.launcher import free_port, pagedserve_command
from tests.cluster import port_open, wait_until

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-fault-load"
NUM_CLIENTS = 64
MAX_TOKENS = 12


@dataclass
class Up:
    base_url: str
    process: subprocess.Popen[str]
    log_path: Path

    def child_pid(self, service: str) -> int:
        """The PID of `up`'s child running `pagedserve <service>`."""
        for child in psutil.Process(self.process.pid).children():
            if service in child.cmdline()[1:4]:
                return child.pid
        raise LookupError(f"no {service} process under pagedserve up:\n{self.log_path.read_text()[-3000:]}")

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"pagedserve up exited:\n{self.log_path.read_text()[-4000:]}")
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def admin(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/admin/scheduler", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("fault-load") / "up.log"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            # An executor timeout above the model's reload time under load, so that the
            # requests of the killed executor wait for its replacement rather than fail.
            [*pagedserve_command(), "up", "--port", str(port), "--admin-key", ADMIN_KEY,
             "--kv-cache-memory", str(256 << 20), "--executor-timeout", "150"],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
        )
        up = Up(f"http://127.0.0.1:{port}", process, log_path)
        try:
            wait_until(up.healthy, 240, "pagedserve up to be healthy", interval_s=0.25)
            yield up
        finally:
            process.terminate()
            assert process.wait(timeout=60) == 0, log_path.read_text()[-4000:]
            assert not port_open(port)


@dataclass
class Outcome:
    leaves_after: int | None  # chunks after which the client disconnects; None: stays
    status: int = 0
    chunks: int = 0
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    events: list[str] = field(default_factory=list)


async def run_client(http: httpx.AsyncClient, index: int, outcome: Outcome, progress: asyncio.Event) -> None:
    body = {
        "prompt": f"Story {index}: once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    async with http.stream("POST", "/v1/completions", json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.error = json.loads(await response.aread())["error"]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                outcome.done = True
                return
            event = json.loads(line[len("data: "):])
            if "error" in event:
                outcome.error = event["error"]
                continue
            if event.get("usage"):
                outcome.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                outcome.chunks += 1
                outcome.finish_reason = choice["finish_reason"] or outcome.finish_reason
            progress.set()
            if outcome.leaves_after is not None and outcome.chunks >= outcome.leaves_after:
                return  # leaving the `async with` drops the connection mid-stream


def test_64_streams_a_third_leaving_and_the_executor_killed_midway(up: Up) -> None:
    rng = random.Random(6)
    leavers = set(rng.sample(range(NUM_CLIENTS), NUM_CLIENTS // 3))
    outcomes = [Outcome(rng.randint(1, MAX_TOKENS // 2) if i in leavers else None) for i in range(NUM_CLIENTS)]
    executor_pid = up.child_pid("executor")

    async def main() -> None:
        progress = asyncio.Event()
        limits = httpx.Limits(max_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(base_url=up.base_url, timeout=httpx.Timeout(240), limits=limits) as http:
            clients = [asyncio.create_task(run_client(http, i, o, progress)) for i, o in enumerate(outcomes)]

            async def kill_midway() -> None:
                while sum(o.chunks >= 2 for o in outcomes) < 8:  # generation well under way
                    progress.clear()
                    await progress.wait()
                os.kill(executor_pid, signal.SIGKILL)

            killer = asyncio.create_task(kill_midway())
            await asyncio.wait_for(asyncio.gather(*clients), 300)
            assert killer.done(), "the executor was never killed: no stream got going"

    asyncio.run(main())

    stayed = [o for o in outcomes if o.leaves_after is None]
    completed = [o for o in stayed if o.error is None]
    for outcome in completed:  # exactly the tokens asked for: none lost, none twice
        assert (outcome.status, outcome.done, outcome.finish_reason, outcome.completion_tokens) == (200, True, "length", MAX_TOKENS), outcome
    for outcome in stayed:
        if outcome.error is not None:  # the only other acceptable end: a clear error, then [DONE]
            assert outcome.error["type"] == "server_error" and outcome.error["message"], outcome
            assert outcome.status != 200 or outcome.done, outcome
    assert len(completed) == len(stayed), [o.error for o in stayed if o.error]

    wait_until(up.healthy, 60, "a healthy server after the restart", interval_s=0.25)
    assert up.child_pid("executor") != executor_pid  # restarted by `up`
    snapshot = up.admin()
    pool = snapshot["block_pool"]
    assert not snapshot["running"] and not snapshot["waiting"]
    assert pool["num_free_blocks"] == pool["num_blocks"]
    assert snapshot["num_executors_lost"] == 1 and snapshot["executor_events"][-1]["event"] == "joined"


def test_a_killed_scheduler_is_restarted_and_serving_resumes(up: Up) -> None:
    scheduler_pid = up.child_pid("scheduler")
    os.kill(scheduler_pid, signal.SIGKILL)
    wait_until(lambda: not up.healthy(), 10, "the gateway to report the scheduler gone", interval_s=0.1)
    wait_until(up.healthy, 60, "the restarted scheduler with the executor rejoined", interval_s=0.25)
    assert up.child_pid("scheduler") != scheduler_pid
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{up.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert "scheduler (pid" in up.log_path.read_text()  # the supervisor said what it did
