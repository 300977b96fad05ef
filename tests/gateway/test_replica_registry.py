"""A gateway in front of two replicas (services/gateway/replica_registry.py, router.py and
the failover in generation.py): real Redis written by the scheduler's own RedisMirror,
real ZeroMQ to two scripted schedulers, a real gateway on uvicorn.

- routing reads `prefix:{replica}` once per request: the replica holding the prompt's
  blocks gets it; with Redis down, the last known loads decide and /health is degraded;
- a replica lost mid-stream: the gateway resubmits prompt + the tokens already streamed
  to the other, which continues: the client sees every token once;
- every replica down: a new request gets its 503 at once, not after the submit timeout;
- a replica that stops holding a request (restarted, message lost) stalls it: the stall
  check fails it over to the other, exactly;
- a replica found in Redis and long dead is forgotten; one named by flags is kept.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.config import GatewayConfig
from pagedserve.services.launcher import free_port
from pagedserve.services.scheduler.prefix_cache import PrefixCacheEvent
from pagedserve.services.scheduler.redis_mirror import RedisMirror
from pagedserve.shared.block_hashing import prompt_block_hashes
from tests.cluster import wait_until
from tests.gateway.conftest import running_gateway
from tests.gateway.fake_scheduler import FakeScheduler, Script, one_token_per_step
from tests.scheduler.test_redis_mirror import start_redis, stop_redis

MODEL = "SmolLM2-135M-Instruct"  # what the scheduler mixes into its block hashes
BLOCK_SIZE = 16


@pytest.fixture()
def redis_port() -> Iterator[int]:
    port = free_port()
    proc = start_redis(port)
    try:
        yield port
    finally:
        if proc.poll() is None:
            stop_redis(proc)


def register(url: str, replica_id: str, address: str, num_running: int = 0) -> RedisMirror:
    """What a scheduler writes: its registration with load and heartbeat."""
    mirror = RedisMirror(url, replica_id)
    mirror.update_replica({
        "heartbeat_at": time.time(), "gateway_address": address, "model": MODEL, "block_size": BLOCK_SIZE,
        "num_running": num_running, "num_waiting": 0, "num_executors_alive": 1, "num_blocks": 64, "num_free_blocks": 64,
    })
    assert mirror.wait_written(5)
    return mirror


def scrape_routing(client: httpx.Client) -> dict[tuple[str, str], float]:
    decisions = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("pagedserve_routing_decisions_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            decisions[(labels["replica"].strip('"'), labels["reason"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return decisions


def test_routes_by_cached_prefix_then_by_last_loads_when_redis_is_down(redis_port: int, tokenizer: PreTrainedTokenizerBase) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"
    replicas = [FakeScheduler(), FakeScheduler()]
    mirrors = [register(url, f"replica-{i}", fake.address) for i, fake in enumerate(replicas)]
    tokens = tokenizer("routed").input_ids
    for fake in replicas:
        fake.script = one_token_per_step(tokens)
    config = GatewayConfig(scheduler_address=",".join(f.address for f in replicas), redis_url=url, stall_timeout_s=2.0)
    try:
        with running_gateway(config, tokenizer) as base_url, httpx.Client(base_url=base_url, timeout=20) as client:
            prompts = [list(range(1000 + 100 * tenant, 1000 + 100 * tenant + 70)) for tenant in range(6)]  # 4 full blocks each
            # Replica 1 holds tenants 0-2's blocks, replica 0 tenants 3-5's.
            for tenant, prompt in enumerate(prompts):
                events = [PrefixCacheEvent(h, stored=True) for h in prompt_block_hashes(prompt, BLOCK_SIZE, MODEL)]
                mirror = mirrors[1] if tenant < 3 else mirrors[0]
                mirror.update_prefix_cache(events)
            assert all(m.wait_written(5) for m in mirrors)
            for tenant, prompt in enumerate(prompts):
                before = [len(f.submits) for f in replicas]
                response = client.post("/v1/completions", json={"prompt": prompt + [7, 7], "max_tokens": 3})
                assert response.status_code == 200, response.text
                expected = 1 if tenant < 3 else 0
                assert len(replicas[expected].submits) == before[expected] + 1, f"tenant {tenant} not on replica {expected}"
            decisions = scrape_routing(client)
            assert decisions[("replica-1", "prefix")] == 3 and decisions[("replica-0", "prefix")] == 3
            health = client.get("/health").json()
            assert health["status"] == "ok" and [r["replica_id"] for r in health["replicas"]] == ["replica-0", "replica-1"]

            # Replica 0 reports 10 running: a new tenant goes to replica 1 ...
            mirrors[0].update_replica({"num_running": 10, "heartbeat_at": time.time()})
            assert mirrors[0].wait_written(5)
            fresh = list(range(9000, 9040))
            before = len(replicas[1].submits)
            assert client.post("/v1/completions", json={"prompt": fresh, "max_tokens": 2}).status_code == 200
            assert len(replicas[1].submits) == before + 1
            # ... and still does from the last known loads once Redis is gone.
            for mirror in mirrors:
                mirror.close()
            mirrors = []
            redis.Redis.from_url(url).shutdown(nosave=True)
            for i in range(3):
                before = len(replicas[1].submits)
                response = client.post("/v1/completions", json={"prompt": list(range(5000 + 50 * i, 5030 + 50 * i)), "max_tokens": 2})
                assert response.status_code == 200, response.text
                assert len(replicas[1].submits) == before + 1
            degraded = client.get("/health")
            assert degraded.status_code == 200 and degraded.json()["status"] == "degraded" and degraded.json()["redis"] == "degraded"
    finally:
        for mirror in mirrors:
            mirror.close()
        for fake in replicas:
            fake.close()


def stream_events(base_url: str, body: dict[str, object]) -> Iterator[dict[str, Any]]:
    """The SSE events of a streamed completion, parsed, [DONE] left out."""
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def wait_all_routable(base_url: str, num_replicas: int) -> None:
    """Until the gateway's /health lists `num_replicas` replicas, every one connected and
    routable (a heartbeat reaching a fake proves only the fake's side of the handshake)."""
    def all_routable() -> bool:
        replicas = httpx.get(f"{base_url}/health", timeout=10).json()["replicas"]
        return len(replicas) == num_replicas and all(r["routable"] and r["scheduler"] == "ok" for r in replicas)

    wait_until(all_routable, 30, f"{num_replicas} routable replicas")


def continue_from(prompt: list[int], tokens: list[int]) -> Script:
    """Emit what is left of `tokens` after those already in the submitted prompt (as a
    replica computing prompt + streamed tokens would), one per step."""

    def script(submit):  # type: ignore[no-untyped-def]
        done = len(submit.prompt_token_ids) - len(prompt)
        assert submit.prompt_token_ids == prompt + tokens[:done]
        return one_token_per_step(tokens[done:])(submit)

    return script


def test_a_replica_lost_mid_stream_is_continued_on_the_other_without_repeating_or_losing_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    first, second = FakeScheduler(step_interval_s=0.05), FakeScheduler()
    prompt = list(range(2000, 2040))
    tokens = tokenizer(" one two three four five six seven eight nine ten eleven twelve").input_ids
    first.script = second.script = continue_from(prompt, tokens)
    config = GatewayConfig(scheduler_address=f"{first.address},{second.address}", stall_timeout_s=5.0)
    closed = False
    try:
        with running_gateway(config, tokenizer) as base_url:
            wait_all_routable(base_url, 2)  # both connected before routing decides
            body = {"prompt": prompt, "max_tokens": len(tokens), "stream": True, "stream_options": {"include_usage": True}}
            text, usage, errors = "", None, []
            for event in stream_events(base_url, body):
                if "error" in event:
                    errors.append(event["error"])
                    continue
                usage = event.get("usage") or usage
                for choice in event["choices"]:
                    text += choice["text"]
                if not closed and text:
                    # Lose whichever replica took it, three tokens in.
                    serving = first if first.submits else second
                    serving.wait_for(lambda: all(a.num_sent >= 3 for a in serving._active.values()), what="3 tokens")
                    serving.close()
                    closed = True
                    survivor = second if serving is first else first
            assert not errors
            assert text == tokenizer.decode(tokens)
            assert usage["completion_tokens"] == len(tokens) and usage["prompt_tokens"] == len(prompt)
            resubmitted = survivor.submits[-1]
            num_streamed = len(resubmitted.prompt_token_ids) - len(prompt)
            assert 3 <= num_streamed < len(tokens)
            assert resubmitted.sampling_params.max_tokens == len(tokens) - num_streamed
    finally:
        for fake in (first, second):
            if not (closed and fake is serving):
                fake.close()


def test_every_replica_down_is_a_503_at_once(tokenizer: PreTrainedTokenizerBase) -> None:
    fake = FakeScheduler()
    # A submit timeout far past the client's: a gateway that waited for it instead of
    # answering at once would fail the request with a client timeout, not a 503.
    config = GatewayConfig(scheduler_address=fake.address, submit_timeout_s=600.0, status_timeout_s=1.0)
    with running_gateway(config, tokenizer) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
        fake.script = one_token_per_step([5, 6])
        assert client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}).status_code == 200
        fake.close()
        wait_until(lambda: client.get("/health").status_code == 503, 30, "the gateway to see the scheduler gone")
        response = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"
        assert response.headers.get("retry-after")


def test_a_request_its_replica_forgot_is_continued_on_the_other(tokenizer: PreTrainedTokenizerBase) -> None:
    """A replica that is alive but no longer holds a request (a restarted scheduler, a lost
    message) stalls it: the stall check finds it missing and fails it over, exactly."""
    first, second = FakeScheduler(step_interval_s=0.05), FakeScheduler(step_interval_s=0.05)
    prompt = list(range(3000, 3040))
    tokens = tokenizer(" alpha beta gamma delta epsilon zeta eta theta iota kappa").input_ids
    first.script = second.script = continue_from(prompt, tokens)
    config = GatewayConfig(scheduler_address=f"{first.address},{second.address}", stall_timeout_s=0.5)
    try:
        with running_gateway(config, tokenizer) as base_url:
            wait_all_routable(base_url, 2)
            body = {"prompt": prompt, "max_tokens": len(tokens), "stream": True}
            text, errors, forgot = "", [], None
            for event in stream_events(base_url, body):
                if "error" in event:
                    errors.append(event["error"])
                    continue
                text += "".join(choice["text"] for choice in event["choices"])
                if forgot is None and text:
                    forgot = first if first.submits else second
                    forgot.wait_for(lambda: all(a.num_sent >= 3 for a in forgot._active.values()), what="3 tokens")
                    forgot.forget_all()
            assert not errors, errors
            assert text == tokenizer.decode(tokens)
            other = second if forgot is first else first
            assert len(other.submits) == 1
            num_streamed = len(other.submits[0].prompt_token_ids) - len(prompt)
            assert 3 <= num_streamed < len(tokens)
    finally:
        first.close()
        second.close()


def test_a_long_dead_replica_found_in_redis_is_forgotten(redis_port: int, tokenizer: PreTrainedTokenizerBase) -> None:
    """Replicas discovered in Redis leave the gateway's list once disconnected with a
    heartbeat past _FORGET_AFTER_S; one named by flags stays."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    named, found = FakeScheduler(), FakeScheduler()
    mirrors = [register(url, "replica-0", named.address), register(url, "replica-1", found.address)]
    named.script = found.script = one_token_per_step(tokenizer("ok").input_ids)
    config = GatewayConfig(scheduler_address=named.address, redis_url=url, stall_timeout_s=2.0)
    try:
        with running_gateway(config, tokenizer) as base_url, httpx.Client(base_url=base_url, timeout=20) as client:
            def listed() -> list[str]:
                return [r["replica_id"] for r in client.get("/health").json()["replicas"]]

            wait_until(lambda: client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1}).status_code == 200
                       and listed() == ["replica-0", "replica-1"], 10, "both replicas listed")
            found.close()
            mirrors[1].update_replica({"heartbeat_at": time.time() - 120})  # its last beat, two minutes ago
            assert mirrors[1].wait_written(5)
            # Routing reads Redis: the dead one is dropped once its connection is seen down.
            wait_until(lambda: client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1}).status_code == 200
                       and listed() == ["replica-0"], 10, "the dead replica forgotten")
            # The one named by flags stays even when its registration goes stale.
            mirrors[0].update_replica({"heartbeat_at": time.time() - 120})
            assert mirrors[0].wait_written(5)
            assert client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 1}).status_code == 200
            assert listed() == ["replica-0"]
    finally:
        for mirror in mirrors:
            mirror.close()
        named.close()
        with contextlib.suppress(Exception):
            found.close()
