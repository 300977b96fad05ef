"""The gateway in front of the real scheduler and executor (real processes, embedded
model): what the fake scheduler cannot vouch for."""

from __future__ import annotations


import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerBase

from tests.cluster import SHARED_ADMIN_KEY, Cluster, wait_until
from tests.gateway.sse import sse_events

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
ADMIN_KEY = SHARED_ADMIN_KEY


@pytest.fixture(scope="module")
def cluster(default_cluster: Cluster) -> Cluster:
    return default_cluster  # the session's (tests/conftest.py): no API key required, the header is harmless


@pytest.fixture()
def sdk(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="e2e-key", max_retries=0, timeout=60)


def scheduler_snapshot(cluster: Cluster) -> dict:
    response = httpx.get(f"{cluster.base_url}/admin/scheduler", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
    assert response.status_code == 200
    return response.json()


def test_greedy_completion_streamed_or_not_agrees_on_text_and_usage(sdk: openai.OpenAI, tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = "The capital of France is"
    completion = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens == len(tokenizer(prompt).input_ids)  # HF's own tokenizer
    assert 0 < usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if completion.choices[0].finish_reason == "length":
        assert usage.completion_tokens == 8
    stream = list(sdk.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    # Greedy is deterministic: the same text, the same counts, streamed or not.
    assert "".join(c.choices[0].text for c in stream if c.choices) == completion.choices[0].text
    assert stream[-1].usage is not None and stream[-1].usage.model_dump() == usage.model_dump()

    messages = [{"role": "user", "content": "Count to five."}]
    chunks = list(sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    chat_usage = chunks[-1].usage
    assert chat_usage is not None and 0 < chat_usage.completion_tokens <= 20
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat_usage.prompt_tokens == len(templated["input_ids"] if hasattr(templated, "keys") else templated)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_stop_string_stops_the_scheduler_too(sdk: openai.OpenAI, cluster: Cluster) -> None:
    result = sdk.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=40, temperature=0, stop=[" 7"], n=2)
    for choice in result.choices:
        assert choice.finish_reason == "stop" and " 7" not in choice.text
    wait_until(lambda: not scheduler_snapshot(cluster)["running"], 10, "the scheduler to drop the stopped requests")


def test_disconnect_frees_the_blocks(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    headers = {"Authorization": "Bearer e2e-key"}
    with httpx.Client(base_url=cluster.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            # /admin/scheduler may serve a snapshot up to 0.5 s old: wait for one that shows it.
            wait_until(lambda: bool(scheduler_snapshot(cluster)["running"]), 10, "the request to be running")

    def freed() -> bool:
        snapshot = scheduler_snapshot(cluster)
        return not snapshot["running"] and not snapshot["waiting"] and snapshot["block_pool"]["num_used_blocks"] == 0
    wait_until(freed, 10, "the aborted request's blocks to be freed")


def test_health_metrics_and_errors(cluster: Cluster) -> None:
    health = httpx.get(f"{cluster.base_url}/health", timeout=5).json()
    assert health == {**health, "status": "ok", "redis": "ok"}
    metrics = httpx.get(f"{cluster.base_url}/metrics", timeout=5).text
    assert "pagedserve_kv_blocks_free" in metrics and "pagedserve_time_to_first_token_seconds_bucket" in metrics
    too_long = httpx.post(
        f"{cluster.base_url}/v1/completions", json={"prompt": [5] * 10**4, "max_tokens": 1},
        headers={"Authorization": "Bearer e2e-key"}, timeout=10,
    )
    assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
    events = sse_events(httpx.post(
        f"{cluster.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True},
        headers={"Authorization": "Bearer e2e-key"}, timeout=30,
    ).text)
    # Three tokens at most, then the finish reason on the last choice chunk.
    choices = [e["choices"][0] for e in events if e.get("choices")]
    assert 1 <= len(choices) <= 3 + 1 and choices[-1]["finish_reason"] in ("stop", "length")
    assert "".join(c["text"] for c in choices)
