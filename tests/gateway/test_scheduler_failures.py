"""What clients see when the scheduler refuses, loses a request, or is not there: the
right status (429 with Retry-After, 503), never a hang and never a 500."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.shared.messages import RequestError
from tests.gateway.conftest import gateway_config, running_gateway
from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step
from tests.gateway.sse import sse_events
from tests.gateway.test_validation import assert_openai_error


@pytest.fixture(scope="module")
def quick_url(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    """A gateway that checks on silent requests after 0.3 s instead of 10 s."""
    with running_gateway(gateway_config(fake_scheduler, stall_timeout_s=0.3), tokenizer) as url:
        yield url


@pytest.fixture()
def quick(quick_url: str, scheduler: FakeScheduler) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=quick_url, timeout=20) as http:
        yield http


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after(client: httpx.Client, scheduler: FakeScheduler, stream: bool) -> None:
    scheduler.refuse = RequestError("", 429, "waiting queue is full (1,024 requests)", retry_after_s=2.5)
    response = client.post("/v1/completions", json={"prompt": "p", "stream": stream})
    error = assert_openai_error(response, 429)
    assert error["type"] == "rate_limit_error" and "queue is full" in error["message"]
    assert response.headers["retry-after"] == "3"


@pytest.mark.parametrize("status", [400, 503])
def test_scheduler_refusals_keep_their_status(client: httpx.Client, scheduler: FakeScheduler, status: int) -> None:
    scheduler.refuse = RequestError("", status, "refused for a reason")
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert assert_openai_error(response, status)["message"] == "refused for a reason"


def test_a_refusal_for_one_of_n_choices_aborts_the_others(client: httpx.Client, scheduler: FakeScheduler) -> None:
    scheduler.refuse = RequestError("", 429, "full", retry_after_s=1)
    assert_openai_error(client.post("/v1/completions", json={"prompt": "p", "n": 3, "max_tokens": 3}), 429)
    ids = {s.request_id for s in scheduler.submits}
    scheduler.wait_for(lambda: ids <= set(scheduler.aborted), what="aborts of every choice")


def test_a_lost_request_is_503_not_a_hang(quick: httpx.Client, scheduler: FakeScheduler) -> None:
    scheduler.drop_submits = True
    started = time.monotonic()
    error = assert_openai_error(quick.post("/v1/completions", json={"prompt": "p", "max_tokens": 3}), 503)
    assert "no longer holds" in error["message"]
    assert time.monotonic() - started < 5
    assert scheduler.num_info_queries >= 1 and scheduler.num_status_queries == 0


def test_a_queued_request_is_not_mistaken_for_a_lost_one(quick: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer("late").input_ids)
    scheduler.hold = True  # held (so its info answers say) but silent, well past the 0.3 s stall timeout
    with httpx.Client(base_url=str(quick.base_url), timeout=20) as other:
        import threading

        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", other.post("/v1/completions", json={"prompt": "p", "max_tokens": 3})))
        thread.start()
        scheduler.wait_for(lambda: len(scheduler.submits) == 1, what="the submit")
        scheduler.wait_for(lambda: scheduler.num_info_queries >= 3, what="stall checks")
        scheduler.hold = False
        thread.join(timeout=10)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == "late"
    assert scheduler.num_status_queries == 0  # stall checks ask small questions, never for the full snapshot


def test_a_scheduler_that_vanishes_mid_stream_ends_the_stream_with_an_error(
    quick: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase
) -> None:
    scheduler.script = one_token_per_step(tokenizer("word " * 100).input_ids)
    with quick.stream("POST", "/v1/completions", json={"prompt": "p", "max_tokens": 100, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
        scheduler.forget_all()
        body = "".join(line + "\n" for line in lines)
    events = sse_events("data: {}\n" + body)
    assert "no longer holds" in events[-1]["error"]["message"]


def test_no_scheduler_at_all(tokenizer: PreTrainedTokenizerBase, fake_scheduler: FakeScheduler) -> None:
    config = gateway_config(fake_scheduler, scheduler_address="tcp://127.0.0.1:1", status_timeout_s=0.3, submit_timeout_s=0.3)
    with running_gateway(config, tokenizer) as url, httpx.Client(base_url=url, timeout=20) as http:
        started = time.monotonic()
        assert_openai_error(http.post("/v1/completions", json={"prompt": "p"}), 503, code="service_unavailable")
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["scheduler"] == "not answering" and health.json()["status"] == "unavailable"
        assert_openai_error(http.get("/admin/scheduler"), 503)
        assert time.monotonic() - started < 5
        assert "pagedserve_scheduler_up" in http.get("/metrics").text


def test_health_needs_a_live_executor(client: httpx.Client, scheduler: FakeScheduler) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["redis"] == "disabled" and body["executors_alive"] == 1
    scheduler.executor_alive = False
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["scheduler"] == "no live executor"
    # Each check is one small info query, never the full snapshot.
    assert (scheduler.num_info_queries, scheduler.num_status_queries) == (2, 0)


def test_only_the_admin_page_asks_for_the_full_snapshot(tokenizer: PreTrainedTokenizerBase, fake_scheduler: FakeScheduler, scheduler: FakeScheduler) -> None:
    scheduler.script = one_token_per_step(tokenizer("counted").input_ids)
    # A gateway of its own: its start-up query and its first request's context-length
    # lookup happen within this test.
    with running_gateway(gateway_config(fake_scheduler), tokenizer) as url, httpx.Client(base_url=url, timeout=20) as http:
        assert http.post("/v1/completions", json={"prompt": "p", "max_tokens": 5}).json()["choices"][0]["text"] == "counted"
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == scheduler.max_model_len
        assert http.get("/health").status_code == 200
        assert "pagedserve_num_requests_running" in http.get("/metrics").text
        assert scheduler.num_info_queries >= 2 and scheduler.num_status_queries == 0
        admin = http.get("/admin/scheduler")
        assert admin.status_code == 200 and admin.json()["max_model_len"] == scheduler.max_model_len
        assert scheduler.num_status_queries == 1
