"""The whole platform over HTTP (real redis-server, scheduler, executor, gateway processes,
embedded model): 32 concurrent greedy streams give exactly HF transformers' greedy text,
the admin status shows a running request's block table while it streams, and Redis holds
each request's metadata afterwards.

The executor runs in float64 here, as does the reference, so that batching
differences cannot flip an fp32 near-tie (see NOTES: exactness).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.model_source import default_model_source
from pagedserve.shared.tokenizer import encode_prompt, load_tokenizer
from tests.cluster import SHARED_ADMIN_KEY, SHARED_API_KEY, Cluster, wait_until
from tests.engine.hf_reference import hf_greedy_ignoring_eos

pytestmark = pytest.mark.slow

ADMIN_KEY = SHARED_ADMIN_KEY
AUTH = {"Authorization": f"Bearer {SHARED_API_KEY}"}
MAX_TOKENS = 16
PROMPTS = [f"Item {i}: the {w} of the" for i, w in enumerate(
    ["history", "color", "size", "name", "shape", "price", "taste", "sound"] * 4)]


@pytest.fixture(scope="module")
def cluster(float64_cluster: Cluster) -> Cluster:
    return float64_cluster  # the session's (tests/conftest.py)


def admin_snapshot(cluster: Cluster) -> dict:
    response = httpx.get(f"{cluster.base_url}/admin/scheduler", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
    assert response.status_code == 200
    return response.json()


def test_32_concurrent_streams_equal_hf_greedy(cluster: Cluster, hf_model_float64) -> None:  # type: ignore[no-untyped-def]
    """The served tokens against HF transformers directly (float64 both sides), not
    against our own in-process engine."""
    tokenizer = load_tokenizer(default_model_source())
    reference = hf_greedy_ignoring_eos(hf_model_float64, [encode_prompt(tokenizer, p) for p in PROMPTS], MAX_TOKENS)
    expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids in reference]

    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=SHARED_API_KEY, max_retries=0, timeout=120)

    def stream(prompt: str) -> tuple[str, str | None, str]:
        chunks = client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
        text, finish, request_id = "", None, ""
        for chunk in chunks:
            request_id = chunk.id
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish, request_id

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        results = list(pool.map(stream, PROMPTS))

    assert [text for text, _, _ in results] == expected
    assert {finish for _, finish, _ in results} == {"length"}
    pool_status = admin_snapshot(cluster)["block_pool"]
    assert pool_status["num_free_blocks"] == pool_status["num_blocks"]

    # A request held open (it streams until its client leaves) shows its block table in
    # /admin/scheduler: a state that lasts until the test ends it, not one a poll could miss.
    body = {"prompt": PROMPTS[0], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=cluster.base_url, headers=AUTH, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # kept: an iterator dropped here would close the stream
        assert next(lines).startswith("data: {")
        wait_until(lambda: any(r["block_ids"] and r["max_tokens"] == 2000 for r in admin_snapshot(cluster)["running"]),
                   60, "the held request's block table in /admin/scheduler")
        (held,) = admin_snapshot(cluster)["running"]
        # Its prompt and what it generated so far, in 16-token blocks.
        assert len(held["block_ids"]) >= -(-(held["num_prompt_tokens"] + held["num_output_tokens"] - 1) // 16)
    wait_until(lambda: admin_snapshot(cluster)["block_pool"]["num_used_blocks"] == 0, 30, "the held request's blocks back")

    records = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    request_id = results[0][2]
    keys = records.keys(f"req:{request_id}*")
    assert keys, f"no redis record for {request_id}"
    wait_until(lambda: all(records.hget(k, "status") == "finished" for k in keys), 10, "finished records in redis")
    # The gateway's record (the one writer of `req:*`) names the replica, from the scheduler's info answer.
    record = records.hgetall(keys[0])
    assert record["replica_id"] == "replica-0"
    assert float(record["arrival_time"]) <= float(record["first_token_time"]) <= float(record["finished_time"])
    assert records.ttl(keys[0]) > 0


def test_n_samples_compute_the_prompt_once_and_equal_separate_seeded_requests(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=SHARED_API_KEY, max_retries=0, timeout=120)
    prompt, seed = "The three most useful kitchen tools are", 1234
    sampling = dict(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.9, extra_body={"ignore_eos": True})

    def settled_num_admissions() -> int:
        """Prefix-cache lookups so far (one per admission: a forked sample is none), read
        once every block is free, so no request is still on its way in."""
        num_queries: list[int] = []

        def idle() -> bool:
            pool = admin_snapshot(cluster)["block_pool"]
            num_queries.append(pool["prefix_cache"]["num_queries"])
            return pool["num_free_blocks"] == pool["num_blocks"]

        wait_until(idle, 30, "every block to be free")
        return num_queries[-1]

    admissions_before = settled_num_admissions()
    together = client.completions.create(n=2, seed=seed, **sampling)
    # The prompt was admitted, so computed, once; both samples forked off it.
    wait_until(lambda: settled_num_admissions() == admissions_before + 1, 10, "the n=2 request's one admission")
    separate = [client.completions.create(seed=seed + i, **sampling) for i in range(2)]

    assert [c.index for c in together.choices] == [0, 1]
    assert [c.text for c in together.choices] == [s.choices[0].text for s in separate]  # sample i = seed + i
    assert separate[0].choices[0].text != separate[1].choices[0].text
    assert together.usage.prompt_tokens == separate[0].usage.prompt_tokens  # counted once
    assert together.usage.completion_tokens == 2 * MAX_TOKENS

    greedy = client.completions.create(n=2, **{**sampling, "temperature": 0})
    assert greedy.choices[0].text == greedy.choices[1].text
    settled_num_admissions()  # every block free again

    # One record per request in Redis, none per forked sample (`req:{id}-0#1`).
    records = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    key = f"req:{together.id}-0"
    wait_until(lambda: records.hget(key, "status") == "finished", 10, "the finished record")
    assert records.keys(f"req:{together.id}*") == [key]
    assert records.hget(key, "finish_reason") == "length,length"  # one per sample


def test_beam_search_over_http_equals_the_engine(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=SHARED_API_KEY, max_retries=0, timeout=120)
    prompt = "The three most useful kitchen tools are"
    beam = {"beam_width": 3, "length_penalty": 0.8}
    request = dict(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=12, n=2, extra_body=beam)
    whole = client.completions.create(**request)
    streamed = ["", ""]
    finish_reasons: list[str | None] = [None, None]
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            finish_reasons[choice.index] = choice.finish_reason or finish_reasons[choice.index]

    engine = LLMEngine(EngineConfig(dtype="float64", kv_cache_memory_bytes=64 << 20))
    reference = engine.generate([prompt], SamplingParams(max_tokens=12, n=2, beam_width=3, length_penalty=0.8))[0]
    assert [c.text for c in whole.choices] == [o.text for o in reference.outputs] == streamed
    assert [c.finish_reason for c in whole.choices] == [o.finish_reason for o in reference.outputs] == finish_reasons
    assert whole.choices[0].text != whole.choices[1].text

    # Beam-search fields are checked like any other.
    for extra, param in (({"beam_width": 2}, "n"), ({"beam_width": 1000}, "beam_width"), ({"beam_width": 2, "early_stopping": "sometimes"}, "early_stopping")):
        response = httpx.post(
            f"{cluster.base_url}/v1/completions",
            json={"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 4, "n": 3, **extra},
            headers=AUTH, timeout=30,
        )
        assert response.status_code == 400, response.text
        assert param in response.text
    pool = admin_snapshot(cluster)["block_pool"]
    wait_until(lambda: admin_snapshot(cluster)["block_pool"]["num_used_blocks"] == 0, 30, "every beam's blocks back")
    # The pool the flags ask for: --kv-cache-memory over one block of K and V in float64
    # (SmolLM2: 30 layers, 3 KV heads of 64, 16 tokens a block).
    assert pool["num_blocks"] == cluster.kv_cache_memory // (2 * 30 * 3 * 64 * 16 * 8)
