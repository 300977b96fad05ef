"""The official OpenAI SDK against a real gateway: what real clients will do."""

from __future__ import annotations

import openai
import pytest
from transformers import PreTrainedTokenizerBase

from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step

REPLY = "Blocks of sixteen tokens. 🚀"


@pytest.fixture()
def sdk(gateway_url: str, scheduler: FakeScheduler) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=20)


def test_sdk_completion(sdk: openai.OpenAI, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer(REPLY).input_ids)
    completion = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt="How big is a block?", max_tokens=30, temperature=0)
    assert completion.choices[0].text == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == len(tokenizer(REPLY).input_ids)


def test_sdk_streaming_chat(sdk: openai.OpenAI, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer(REPLY).input_ids)
    stream = sdk.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "How big is a block?"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"top_k": 20},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(tokenizer(REPLY).input_ids)
    assert scheduler.submits[0].sampling_params.top_k == 20


def test_sdk_models_and_errors(sdk: openai.OpenAI, scheduler: FakeScheduler) -> None:
    assert [m.id for m in sdk.models.list()] == ["SmolLM2-135M-Instruct"]
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.completions.create(model="gpt-4", prompt="x")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "x"}], n=100)
