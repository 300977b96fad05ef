"""The per-request deadline over HTTP: the `timeout` field (bounded by the server's
--request-timeout, which is also the default) aborts the request at the scheduler when it
passes. Nothing generated yet: 504, code `timeout`. Something generated: a stream ends
with an "abort" chunk and an error event, a whole response returns the partial text with
finish_reason "abort"."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.shared.messages import SubmitRequest
from tests.gateway.conftest import gateway_config, running_gateway
from tests.gateway.fake_scheduler import FakeScheduler, Script
from tests.gateway.sse import sse_events
from tests.gateway.test_validation import assert_openai_error

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def some_tokens_then_nothing(token_ids: list[int]) -> Script:
    """`token_ids`, then empty steps for minutes: the request stays busy at the scheduler,
    with (empty) deltas still flowing, and does not finish by itself within a test."""

    def script(submit: SubmitRequest) -> tuple[list[list[int]], str]:
        return [[t] for t in token_ids] + [[]] * 100_000, "length"

    return script


def wait_for_abort(scheduler: FakeScheduler) -> None:
    ids = {s.request_id for s in scheduler.submits}
    assert ids
    scheduler.wait_for(lambda: ids <= set(scheduler.aborted), what="the scheduler to receive the abort")


@pytest.mark.parametrize("stream", [False, True])
def test_nothing_generated_by_the_deadline_is_504(client: httpx.Client, scheduler: FakeScheduler, stream: bool) -> None:
    scheduler.hold = True  # accepted, never stepped
    started = time.monotonic()
    response = client.post(COMPLETIONS, json={"prompt": "p", "max_tokens": 5, "timeout": 0.5, "stream": stream})
    elapsed_s = time.monotonic() - started
    error = assert_openai_error(response, 504, code="timeout")
    assert error["type"] == "server_error" and "0.5 s" in error["message"]
    assert 0.5 <= elapsed_s < 5
    wait_for_abort(scheduler)


def test_a_whole_response_keeps_the_partial_text(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("so far so good").input_ids
    scheduler.script = some_tokens_then_nothing(token_ids)
    response = client.post(COMPLETIONS, json={"prompt": "p", "max_tokens": 100, "timeout": 0.8, "n": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["abort", "abort"]
    assert [c["text"] for c in body["choices"]] == ["so far so good"] * 2
    assert body["usage"]["completion_tokens"] == 2 * len(token_ids)
    wait_for_abort(scheduler)


def test_a_stream_ends_with_abort_then_an_error_event(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("streamed so far").input_ids
    scheduler.script = some_tokens_then_nothing(token_ids)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "timeout": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200
    events = sse_events(response.text)
    *chunks, usage, error = events
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "streamed so far"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["abort"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(token_ids)
    assert set(error) == {"error"} and error["error"]["code"] == "timeout" and "0.8 s" in error["error"]["message"]
    wait_for_abort(scheduler)


@pytest.mark.parametrize(
    ("timeout", "code"),
    [(0, "invalid_value"), (-1, "invalid_value"), ("5", "invalid_type"), (1e9 + 1, "invalid_value"), (601, "invalid_value"), (None, None)],
)
def test_timeout_out_of_bounds_is_400(client: httpx.Client, scheduler: FakeScheduler, timeout: object, code: str | None) -> None:
    response = client.post(COMPLETIONS, json={"prompt": "p", "max_tokens": 1, "timeout": timeout})
    if code is None:  # null: the server's default
        assert response.status_code == 200
        return
    error = assert_openai_error(response, 400, param="timeout", code=code)
    if timeout == 601:
        assert "600" in error["message"]  # names the server's limit
    assert scheduler.submits == []


@pytest.fixture(scope="module")
def short_deadline_url(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    with running_gateway(gateway_config(fake_scheduler, request_timeout_s=0.5), tokenizer) as url:
        yield url


def test_the_server_default_applies_and_bounds_the_field(short_deadline_url: str, scheduler: FakeScheduler) -> None:
    scheduler.hold = True
    with httpx.Client(base_url=short_deadline_url, timeout=20) as http:
        started = time.monotonic()
        assert_openai_error(http.post(COMPLETIONS, json={"prompt": "p", "max_tokens": 3}), 504, code="timeout")
        assert time.monotonic() - started < 5
        wait_for_abort(scheduler)
        assert_openai_error(http.post(COMPLETIONS, json={"prompt": "p", "timeout": 1}), 400, param="timeout")
