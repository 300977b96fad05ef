"""POST /v1/completions against a fake scheduler: text, usage, streaming framing, stop
strings, n samples as one request and prompt batches, logprobs."""

from __future__ import annotations

import httpx
from transformers import PreTrainedTokenizerBase

from pagedserve.shared.messages import SubmitRequest
from tests.gateway.fake_scheduler import FakeScheduler, Script, one_token_per_step
from tests.gateway.sse import sse_events

TEXT = "Paged attention stores the KV cache in fixed-size blocks."


def test_non_streaming_completion(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer(TEXT).input_ids
    scheduler.script = one_token_per_step(token_ids)
    response = client.post("/v1/completions", json={"prompt": "Explain paging", "max_tokens": 100, "model": "SmolLM2-135M-Instruct"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["choices"] == [{"index": 0, "text": TEXT, "logprobs": None, "finish_reason": "stop", "prompt_logprobs": None}]
    prompt_ids = tokenizer("Explain paging").input_ids
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == len(token_ids)
    assert body["usage"]["total_tokens"] == len(prompt_ids) + len(token_ids)
    (submit,) = scheduler.submits
    assert submit.prompt_token_ids == prompt_ids
    assert submit.request_id == f"{body['id']}-0"
    assert submit.sampling_params.max_tokens == 100


def test_default_max_tokens_is_16_and_length_finish(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer(TEXT * 3).input_ids)
    body = client.post("/v1/completions", json={"prompt": "x"}).json()
    assert scheduler.submits[0].sampling_params.max_tokens == 16
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16


def test_streaming_framing_and_usage(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer(TEXT).input_ids)
    response = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 50, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert all("usage" not in event for event in events)
    assert "".join(e["choices"][0]["text"] for e in events) == TEXT
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "stop"
    assert all(e["object"] == "text_completion" for e in events)

    response = client.post(
        "/v1/completions", json={"prompt": "p", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = sse_events(response.text)
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == len(tokenizer(TEXT).input_ids)
    assert all("usage" not in event for event in events[:-1])


def test_stop_string_split_across_deltas(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    pieces = ["Hello world#", "#", "# and then", " more"]
    steps = [tokenizer(piece).input_ids for piece in pieces]
    scheduler.script = lambda submit: (steps, "length")
    response = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 50, "stop": ["###"], "stream": True})
    events = sse_events(response.text)
    texts = [e["choices"][0]["text"] for e in events]
    assert "".join(texts) == "Hello world"
    assert not any("#" in text for text in texts)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # The scheduler only knows token stops: the gateway must have told it to stop.
    request_id = scheduler.submits[0].request_id
    scheduler.wait_for(lambda: request_id in scheduler.aborted, what="the abort after a stop string")

    scheduler.reset()
    scheduler.script = lambda submit: (steps, "length")
    body = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 50, "stop": "# and"}).json()
    assert body["choices"][0]["text"] == "Hello world##"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_multibyte_characters_stream_whole(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    text = "你好世界 🎉🚀 done"
    scheduler.script = one_token_per_step(tokenizer(text).input_ids)
    events = sse_events(client.post("/v1/completions", json={"prompt": "p", "max_tokens": 50, "stream": True}).text)
    texts = [e["choices"][0]["text"] for e in events]
    assert not any("\ufffd" in t for t in texts)
    assert "".join(texts) == text


def per_seed(texts: dict[int, str], tokenizer: PreTrainedTokenizerBase) -> Script:
    """A script whose tokens depend on the (sample's) seed, as seeded sampling's do."""

    def script(submit: SubmitRequest) -> tuple[list[list[int]], str]:
        return one_token_per_step(tokenizer(texts[submit.sampling_params.seed or 0]).input_ids)(submit)

    return script


def test_n_is_one_request_whose_samples_use_consecutive_seeds(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    texts = {7: "abc", 8: "de f", 9: "ghij"}
    scheduler.script = per_seed(texts, tokenizer)
    body = client.post("/v1/completions", json={"prompt": "p", "n": 3, "seed": 7, "max_tokens": 5, "temperature": 0.8}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == ["abc", "de f", "ghij"]  # sample i: seed 7 + i
    (submit,) = scheduler.submits  # the scheduler computes the prompt once and forks the samples
    assert submit.request_id == f"{body['id']}-0"
    assert (submit.sampling_params.n, submit.sampling_params.seed, submit.sampling_params.temperature) == (3, 7, 0.8)
    assert body["usage"]["prompt_tokens"] == len(tokenizer("p").input_ids)  # the prompt counts once
    assert body["usage"]["completion_tokens"] == sum(len(tokenizer(t).input_ids) for t in texts.values())


def test_n_streams_each_sample_under_its_choice_index(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    texts = {7: "one two", 8: "three four five"}
    scheduler.script = per_seed(texts, tokenizer)
    events = sse_events(client.post("/v1/completions", json={"prompt": "p", "n": 2, "seed": 7, "max_tokens": 9, "stream": True}).text)
    for index, text in enumerate(texts.values()):
        chunks = [c for e in events for c in e["choices"] if c["index"] == index]
        assert "".join(c["text"] for c in chunks) == text and chunks[-1]["finish_reason"] == "stop"


def test_a_stop_string_in_one_sample_leaves_the_others_running(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    texts = {1: "alpha STOP beta gamma", 2: "delta epsilon zeta eta"}
    scheduler.script = per_seed(texts, tokenizer)
    body = client.post("/v1/completions", json={"prompt": "p", "n": 2, "seed": 1, "max_tokens": 20, "stop": ["STOP"]}).json()
    assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [("alpha ", "stop"), ("delta epsilon zeta eta", "stop")]
    # Sample 0 stopped first: aborting the request then would have cut sample 1 short.


def test_prompt_batches_and_token_prompts(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer("xy").input_ids)
    body = client.post("/v1/completions", json={"prompt": ["first prompt", "second"], "n": 2, "max_tokens": 5}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt_index * n + sample_index
    assert all(c["text"] == "xy" for c in body["choices"])
    by_id = {s.request_id: s for s in scheduler.submits}  # one request of n samples per prompt
    assert len(by_id) == 2 and all(s.sampling_params.n == 2 for s in by_id.values())
    assert by_id[f"{body['id']}-0"].prompt_token_ids == tokenizer("first prompt").input_ids
    assert by_id[f"{body['id']}-1"].prompt_token_ids == tokenizer("second").input_ids
    assert body["usage"]["prompt_tokens"] == len(tokenizer("first prompt").input_ids) + len(tokenizer("second").input_ids)

    scheduler.reset()
    scheduler.script = one_token_per_step(tokenizer("xy").input_ids)
    client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 5})
    assert scheduler.submits[0].prompt_token_ids == [5, 6, 7]


def test_logprobs_in_completions_format(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer("one two three").input_ids
    scheduler.script = one_token_per_step(token_ids)
    body = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 10, "logprobs": 2}).json()
    assert scheduler.submits[0].sampling_params.logprobs == 2
    logprobs = body["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == "one two three"
    assert logprobs["token_logprobs"] == [-0.5] * len(token_ids)
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == [0, 3, 7][: len(token_ids)]

    events = sse_events(client.post("/v1/completions", json={"prompt": "p", "max_tokens": 10, "logprobs": 0, "stream": True}).text)
    offsets = [o for e in events if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 3, 7][: len(token_ids)]


def test_sampling_fields_reach_the_scheduler(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer("a").input_ids)
    fields = {
        "prompt": "p", "max_tokens": 3, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "presence_penalty": 0.5,
        "frequency_penalty": 0.25, "repetition_penalty": 1.1, "stop_token_ids": [2], "ignore_eos": True,
        "user": "someone",
    }
    assert client.post("/v1/completions", json=fields).status_code == 200
    submit: SubmitRequest = scheduler.submits[0]
    params = submit.sampling_params
    assert (params.top_p, params.top_k, params.min_p) == (0.9, 40, 0.05)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)
    assert params.stop_token_ids == [2] and params.ignore_eos
    # `priority` needs --scheduling-policy priority: tests/gateway/test_hostile_input.py.
