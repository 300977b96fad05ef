"""Every way a request can be wrong gets the right status and an OpenAI-shaped error
body, and none of them reaches the scheduler or causes a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.gateway.fake_scheduler import FakeScheduler

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


JSON_CASES = [
    (COMPLETIONS, {"prompt": "p", "max_tokens": "ten"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "p", "temperature": -1}, "temperature"),
    (COMPLETIONS, {"prompt": "p", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "p", "best_of": 2}, "best_of"),
    (COMPLETIONS, {"prompt": "p", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "p", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "p", "n": 17}, "n"),
    (COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 6}, "n"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": ["a", 1]}, "prompt"),
    (COMPLETIONS, {"prompt": [1, 10_000_000]}, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, "prompt[0]"),
    (COMPLETIONS, {"max_tokens": 5}, "prompt"),
    (COMPLETIONS, {"prompt": "p", "seed": 2**80}, "seed"),
    (COMPLETIONS, {"prompt": "p", "priority": 10**30}, "priority"),
    (COMPLETIONS, {"prompt": "p", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "p", "stop_token_ids": [10**7]}, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "p", "stop": ["x"] * 17}, "stop"),
    (COMPLETIONS, {"prompt": "p", "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"prompt": "p", "stream": "yes"}, "stream"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "messages[0].extra"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"prompt": "p"}, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), JSON_CASES, ids=[f"{p.split('/')[-1]}-{param}" for p, _, param in JSON_CASES])
def test_invalid_fields_are_400_naming_the_field(
    client: httpx.Client, scheduler: FakeScheduler, path: str, body: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(client.post(path, json=body), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert scheduler.submits == []


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code", "fragment"),
    [
        (b'{"prompt": "p",', "application/json", 400, "invalid_json", "not valid JSON"),
        (b'{"prompt": "p"} trailing', "application/json", 400, "invalid_json", "not valid JSON"),
        (b'["prompt"]', "application/json", 400, "invalid_type", "Expected `object`"),
        (b'{"prompt": "\xff\xfe"}', "application/json", 400, "invalid_json", "UTF-8"),
        (b"", "application/json", 400, "invalid_json", "empty"),
        (b'{"prompt": "p"}', "text/plain", 415, "unsupported_media_type", "Content-Type"),
        (b"prompt=p", "application/x-www-form-urlencoded", 415, "unsupported_media_type", "Content-Type"),
        (b'{"prompt": "p", "temperature": 1e999}', "application/json", 400, "invalid_value", "temperature"),
    ],
)
def test_malformed_bodies_are_4xx(
    client: httpx.Client, scheduler: FakeScheduler, content: bytes, content_type: str, status: int, code: str, fragment: str
) -> None:
    response = client.post(COMPLETIONS, content=content, headers={"content-type": content_type})
    assert fragment in assert_openai_error(response, status, code=code)["message"]
    assert scheduler.submits == []


def test_json_with_charset_is_accepted(client: httpx.Client, scheduler: FakeScheduler) -> None:
    response = client.post(COMPLETIONS, content=b'{"prompt": "p", "max_tokens": 1}', headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200


def test_prompt_too_long_for_the_context_names_the_numbers(client: httpx.Client, scheduler: FakeScheduler) -> None:
    max_model_len = scheduler.max_model_len
    too_long = list(range(100, 100 + max_model_len))
    error = assert_openai_error(client.post(COMPLETIONS, json={"prompt": too_long, "max_tokens": 1}), 400, "prompt")
    assert str(max_model_len) in error["message"] and f"is {max_model_len} tokens long" in error["message"]
    error = assert_openai_error(client.post(CHAT, json={"messages": [{"role": "user", "content": "word " * 400}]}), 400, "messages")
    assert str(max_model_len) in error["message"]
    assert scheduler.submits == []
    # max_tokens beyond the room left is not refused: the completion ends at the context.
    fits = client.post(COMPLETIONS, json={"prompt": too_long[1:], "max_tokens": max_model_len})
    assert fits.status_code == 200, fits.text
    assert [submit.sampling_params.max_tokens for submit in scheduler.submits] == [max_model_len]


def test_unknown_model_is_404(client: httpx.Client, scheduler: FakeScheduler) -> None:
    error = assert_openai_error(client.post(COMPLETIONS, json={"prompt": "p", "model": "gpt-9"}), 404, "model", "model_not_found")
    assert "gpt-9" in error["message"]
    assert_openai_error(client.post(CHAT, json={"messages": USER, "model": "gpt-9"}), 404, "model", "model_not_found")


def test_body_too_large_is_413(client: httpx.Client, scheduler: FakeScheduler) -> None:
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    assert_openai_error(client.post(COMPLETIONS, content=big, headers={"content-type": "application/json"}), 413, code="request_too_large")

    def chunked() -> Any:  # no Content-Length: the limit must hold while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    response = client.post(COMPLETIONS, content=chunked(), headers={"content-type": "application/json"})
    assert_openai_error(response, 413, code="request_too_large")


def test_unknown_paths_and_methods_are_openai_shaped(client: httpx.Client, scheduler: FakeScheduler) -> None:
    assert_openai_error(client.get("/v1/engines"), 404, code="unknown_url")
    assert_openai_error(client.post("/nothing-here", json={}), 404)
    assert_openai_error(client.get(COMPLETIONS), 405)
    assert_openai_error(client.delete("/v1/models"), 405)
