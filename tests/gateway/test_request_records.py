"""Request metadata in Redis (`req:{id}` hashes with a TTL), written off the request
path; a Redis that is down degrades /health but never a request."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.request_records import RequestRecorder
from pagedserve.services.launcher import free_port, redis_server_binary
from tests.cluster import wait_until
from tests.gateway.conftest import gateway_config, running_gateway
from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = redis_server_binary()  # raises if set-up did not install one: no skip
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 10, "redis-server")
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def test_requests_are_recorded_with_a_ttl(
    redis_url: str, fake_scheduler: FakeScheduler, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase
) -> None:
    scheduler.script = one_token_per_step(tokenizer("recorded").input_ids)
    config = gateway_config(fake_scheduler, redis_url=redis_url, gateway_id="gw-records")
    with running_gateway(config, tokenizer) as url, httpx.Client(base_url=url, timeout=20) as http:
        assert http.get("/health").json()["redis"] == "ok"
        body = http.post("/v1/completions", json={"prompt": "p", "max_tokens": 7, "seed": 3}).json()
        key = f"req:{body['id']}-0"
        store = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_until(lambda: store.hget(key, "status") == "finished", 5, "the finished record")
        record = store.hgetall(key)
        assert record["gateway_id"] == "gw-records" and record["parent_id"] == body["id"]
        assert record["replica_id"] == "replica-fake"  # from the scheduler's info answer
        assert record["finish_reason"] == "stop" and record["output_tokens"] == str(len(tokenizer("recorded").input_ids))
        assert record["prompt_tokens"] == str(len(tokenizer("p").input_ids))
        assert '"max_tokens":7' in record["sampling_params"] and '"seed":3' in record["sampling_params"]
        assert float(record["arrival_time"]) <= float(record["first_token_time"]) <= float(record["finished_time"])
        assert 0 < store.ttl(key) <= 24 * 3600
        store.close()


def test_redis_down_degrades_health_but_serves(fake_scheduler: FakeScheduler, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer("still fine").input_ids)
    config = gateway_config(fake_scheduler, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with running_gateway(config, tokenizer) as url, httpx.Client(base_url=url, timeout=20) as http:
        response = http.post("/v1/completions", json={"prompt": "p", "max_tokens": 5})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "still fine"
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["redis"] == "degraded"


def test_records_made_while_redis_is_down_are_written_once_it_is_back() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    command = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    store = redis.Redis.from_url(url, decode_responses=True)

    def answers() -> bool:
        try:
            return bool(store.ping())
        except redis.ConnectionError:
            return False

    async def main() -> None:
        recorder = RequestRecorder(url, ttl_s=60)
        await recorder.start()
        try:
            recorder.record("early", {"status": "waiting"})  # nothing listens on that port yet
            recorder.record("early", {"status": "finished", "output_tokens": 3})  # merged into one write
            recorder.record("other", {"status": "waiting"})
            await until(lambda: not recorder._healthy, "the writer's first (failed) attempt")
            assert recorder.num_buffered == 2 and recorder.num_dropped == 0
            assert await recorder.health() == "degraded"
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await until(answers, "redis-server to start")
                # The writer takes a batch out of the buffer before it is written: wait for the write too.
                await until(lambda: recorder.num_buffered == 0 and recorder._healthy, "the buffered records to be written")
                assert store.hgetall("req:early") == {"status": "finished", "output_tokens": "3"}
                assert store.hgetall("req:other") == {"status": "waiting"} and 0 < store.ttl("req:other") <= 60
                assert await recorder.health() == "ok"
            finally:
                process.terminate()
                process.wait(timeout=10)
        finally:
            await recorder.close()

    async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)  # polling interval of a condition wait

    asyncio.run(main())
    store.close()
