"""POST /v1/chat/completions: chat template, default max_tokens from the context left,
streaming role/content chunks, logprobs in the chat format."""

from __future__ import annotations

import httpx
from transformers import PreTrainedTokenizerBase

from pagedserve.shared.tokenizer import encode_chat
from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step
from tests.gateway.sse import sse_events

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache?"}]
REPLY = "A cache of keys and values 🙂."


def test_chat_applies_the_template_and_defaults_max_tokens_to_the_room_left(
    client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase
) -> None:
    scheduler.script = one_token_per_step(tokenizer(REPLY).input_ids + [tokenizer.eos_token_id])
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "logprobs": None, "finish_reason": "stop"}]
    prompt = encode_chat(tokenizer, MESSAGES)
    (submit,) = scheduler.submits
    assert submit.prompt_token_ids == prompt
    assert submit.sampling_params.max_tokens == scheduler.max_model_len - len(prompt)
    assert body["usage"] == {
        "prompt_tokens": len(prompt), "completion_tokens": len(tokenizer(REPLY).input_ids) + 1,
        "total_tokens": len(prompt) + len(tokenizer(REPLY).input_ids) + 1, "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_max_completion_tokens_wins_over_max_tokens(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer(REPLY).input_ids)
    client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 4})
    assert scheduler.submits[0].sampling_params.max_tokens == 4


def test_content_parts_are_joined(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer("ok").input_ids)
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "a KV cache?"}]
    messages = [MESSAGES[0], {"role": "user", "content": parts}]
    assert client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5}).status_code == 200
    assert scheduler.submits[0].prompt_token_ids == encode_chat(tokenizer, MESSAGES)


def test_streaming_chat(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer(REPLY).input_ids)
    response = client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 50, "stream": True, "n": 2, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    for index in (0, 1):
        choice_chunks = [c for e in events[2:-1] for c in e["choices"] if c["index"] == index]
        assert "".join(c["delta"].get("content") or "" for c in choice_chunks) == REPLY
        assert choice_chunks[-1]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2 * len(tokenizer(REPLY).input_ids)


def test_chat_logprobs(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("hi 🎉").input_ids
    scheduler.script = one_token_per_step(token_ids)
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 9, "logprobs": True, "top_logprobs": 3}).json()
    assert scheduler.submits[0].sampling_params.logprobs == 3
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == len(token_ids)
    assert all(entry["logprob"] == -0.5 and len(entry["top_logprobs"]) == 3 for entry in content)
    assert bytes(b for entry in content for b in entry["bytes"]).decode() == "hi 🎉"
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}

    scheduler.reset()
    scheduler.script = one_token_per_step(token_ids)
    client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 9, "logprobs": True})
    assert scheduler.submits[0].sampling_params.logprobs == 0
