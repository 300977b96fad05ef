"""The sampling and API parity fields over real HTTP on the whole platform (redis-server,
scheduler, float64 executor, gateway with an API key; the embedded model):

- `/v1/completions` `echo` with `logprobs`, as lm-evaluation-harness's loglikelihood
  requests send it (max_tokens 0 and 1): the prompt's logprobs equal HF transformers'
  log-softmax of the prompt in float64, the first token's null; a second identical request,
  whose prompt the prefix cache now holds, returns the same; vLLM's `prompt_logprobs`
  agree with them; streamed echo starts with the prompt.
- `logit_bias` and `min_tokens` reach the sampler (a banned token is never produced; EOS
  is held back), and their bad values are 400s naming the field.
- `/tokenize` and `/detokenize` in vLLM's shapes, refused without the API key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch

from pagedserve.shared.model_source import default_model_source
from pagedserve.shared.tokenizer import encode_chat, encode_prompt, load_tokenizer
from tests.cluster import SHARED_API_KEY, Cluster

pytestmark = pytest.mark.slow

API_KEY = SHARED_API_KEY
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to"


@pytest.fixture(scope="module")
def cluster(float64_cluster: Cluster) -> Cluster:
    return float64_cluster  # the session's (tests/conftest.py), with SHARED_API_KEY


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.base_url, headers=AUTH, timeout=120) as client:
        yield client


def hf_prompt_logprobs(model, prompt_ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """float64 [P, vocab] log-softmax of HF's logits over the prompt."""
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0].log_softmax(dim=-1)


def test_echo_logprobs_equal_hf_and_survive_the_prefix_cache(http: httpx.Client, hf_model_float64) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(default_model_source())
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    reference = hf_prompt_logprobs(hf_model_float64, prompt_ids)
    expected = [None] + reference[:-1].gather(1, torch.tensor(prompt_ids[1:]).unsqueeze(1)).squeeze(1).tolist()

    answers = []
    for max_tokens in (0, 0, 1):  # the second: its prompt is in the prefix cache by now
        body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": max_tokens, "temperature": 0, "prompt_logprobs": 1}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    for answer, max_tokens in zip(answers, (0, 0, 1)):
        choice = answer["choices"][0]
        logprobs = choice["logprobs"]
        num_tokens = len(prompt_ids) + max_tokens
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == num_tokens
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        ours = logprobs["token_logprobs"][1 : len(prompt_ids)]
        assert ours == pytest.approx(expected[1:], abs=1e-6)
        # The alternatives: the 2 likeliest, plus the prompt token itself.
        for position in (1, len(prompt_ids) // 2, len(prompt_ids) - 1):
            top = logprobs["top_logprobs"][position]
            assert 2 <= len(top) <= 3
            assert max(top.values()) == pytest.approx(reference[position - 1].max().item(), abs=1e-6)
        assert "".join(logprobs["tokens"][: len(prompt_ids)]) == PROMPT
        assert logprobs["text_offset"][: len(prompt_ids)] == sorted(logprobs["text_offset"][: len(prompt_ids)])
        assert choice["text"].startswith(PROMPT) and (max_tokens == 1 or choice["text"] == PROMPT)
        assert answer["usage"]["prompt_tokens"] == len(prompt_ids)
        assert answer["usage"]["completion_tokens"] == max_tokens
        # vLLM's prompt_logprobs: {token id: {logprob, rank, decoded_token}} per position.
        vllm = choice["prompt_logprobs"]
        assert len(vllm) == len(prompt_ids) and vllm[0] is None
        for position in range(1, len(prompt_ids)):
            entry = vllm[position][str(prompt_ids[position])]
            assert entry["logprob"] == pytest.approx(expected[position], abs=1e-6)
            assert entry["rank"] == int((reference[position - 1] > reference[position - 1][prompt_ids[position]]).sum()) + 1
    assert answers[2]["choices"][0]["logprobs"]["token_logprobs"][-1] is not None
    assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # computed whole, as vLLM

    # Streamed: the first chunk starts with the prompt.
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT) and text.startswith(PROMPT) and len(text) > len(PROMPT)
    whole = http.post("/v1/completions", json={**body, "stream": False}).json()
    assert whole["choices"][0]["text"] == text


def test_logit_bias_and_min_tokens_reach_the_sampler(http: httpx.Client) -> None:
    tokenizer = load_tokenizer(default_model_source())
    chat = [{"role": "user", "content": "List three prime numbers."}]
    plain = http.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 40, "temperature": 0, "logprobs": True})
    assert plain.status_code == 200, plain.text
    plain_answer = plain.json()["choices"][0]
    assert plain_answer["finish_reason"] == "stop"  # ended by EOS
    first_token = tokenizer.encode(plain_answer["logprobs"]["content"][0]["token"])[0]

    banned = http.post("/v1/chat/completions", json={
        "messages": chat, "max_tokens": 5, "temperature": 0, "logprobs": True, "logit_bias": {str(first_token): -100},
    }).json()["choices"][0]
    assert banned["logprobs"]["content"][0]["token"] != plain_answer["logprobs"]["content"][0]["token"]

    num_plain = len(plain_answer["logprobs"]["content"])
    held = http.post("/v1/chat/completions", json={
        "messages": chat, "max_tokens": num_plain + 6, "min_tokens": num_plain + 3, "temperature": 0,
    }).json()
    assert held["usage"]["completion_tokens"] >= num_plain + 3

    vocab_size = len(tokenizer)
    for body, param in [
        ({"logit_bias": {str(vocab_size): 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"echo": True, "max_tokens": 0, "beam_width": 2, "prompt_logprobs": 1}, "prompt_logprobs"),
    ]:
        response = http.post("/v1/completions", json={"prompt": "x", **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] is not None and error["param"].startswith(param), (body, error)
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400  # only with echo


def test_tokenize_and_detokenize(cluster: Cluster, http: httpx.Client) -> None:
    tokenizer = load_tokenizer(default_model_source())
    for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})]:
        refused = httpx.post(cluster.base_url + path, json=body, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"

    answer = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert answer["tokens"] == encode_prompt(tokenizer, PROMPT)
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 8192
    assert "".join(answer["token_strs"]) == PROMPT
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    answer = http.post("/tokenize", json={"messages": messages}).json()
    assert answer["tokens"] == encode_chat(tokenizer, messages)
    without = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert answer["tokens"][: without["count"]] == without["tokens"] and without["count"] < answer["count"]

    assert http.post("/detokenize", json={"tokens": encode_prompt(tokenizer, PROMPT)}).json() == {"prompt": PROMPT}
    for path, body, param in [
        ("/detokenize", {"tokens": [len(tokenizer)]}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
    ]:
        response = http.post(path, json=body)
        assert 400 <= response.status_code < 500 and response.json()["error"]["param"] == param, (body, response.text)
