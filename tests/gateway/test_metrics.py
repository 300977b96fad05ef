"""/metrics in the Prometheus text format: request counts, latency histograms, token
counters, and scheduler gauges refreshed from an info query at scrape time."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerBase

from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step


def scrape(client: httpx.Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model"))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def test_metrics_follow_requests_and_the_scheduler(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    before = scrape(client)
    token_ids = tokenizer("some generated text").input_ids
    scheduler.script = one_token_per_step(token_ids)
    scheduler.num_cached_tokens = 4
    prompt = list(range(10, 18))
    assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 50}).status_code == 200
    after = scrape(client)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[name].get(labels, 0.0) - before.get(name, {}).get(labels, 0.0)

    assert delta("pagedserve_requests_total", (("finish_reason", "stop"),)) == 1
    assert delta("pagedserve_prompt_tokens_total") == len(prompt)
    assert delta("pagedserve_prompt_tokens_cached_total") == 4
    assert delta("pagedserve_generation_tokens_total") == len(token_ids)
    assert delta("pagedserve_time_to_first_token_seconds_count") == 1
    assert delta("pagedserve_e2e_request_latency_seconds_count") == 1
    assert delta("pagedserve_inter_token_latency_seconds_count") == len(token_ids) - 1
    assert after["pagedserve_prefix_cache_hit_rate"][()] > 0
    # From the fake scheduler's info answer: 3 of 8 blocks used.
    assert after["pagedserve_kv_blocks_used"][()] == 3
    assert after["pagedserve_kv_blocks_free"][()] == 5
    assert after["pagedserve_kv_cache_usage"][()] == 3 / 8
    assert after["pagedserve_num_requests_running"][()] == 0
    assert after["pagedserve_num_requests_waiting"][()] == 0
    assert after["pagedserve_scheduler_up"][()] == 1
    # The gauges come from small info answers (shared for half a second), never from the full snapshot.
    assert scheduler.num_status_queries == 0


def test_aborts_and_errors_are_counted(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    from pagedserve.shared.messages import RequestError

    before = scrape(client)
    scheduler.refuse = RequestError("", 429, "full")
    client.post("/v1/completions", json={"prompt": "p"})
    after = scrape(client)
    errors = (("finish_reason", "error"),)
    assert after["pagedserve_requests_total"][errors] - before.get("pagedserve_requests_total", {}).get(errors, 0) == 1
