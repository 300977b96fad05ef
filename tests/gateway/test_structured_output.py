"""Structured output and tool calling through the whole platform (real redis-server,
scheduler, executor and gateway processes, the embedded SmolLM2), driven by the official
`openai` SDK as an application would:

- `client.chat.completions.parse(response_format=<Pydantic model>)` for schemas with
  nested objects, enums, arrays and optional fields: 50 samples at temperature 1.0 (n > 1,
  so forked samples too) all parse and validate. A 135M model at temperature 1.0 does
  not write schema-valid JSON by itself: only the mask makes this pass.
- vLLM's `structured_outputs` regex and choice, and the legacy `guided_choice`, on
  /v1/completions.
- bad grammars are 400s naming the field; beam search with a grammar is refused.
- tools: a forced call (named, then "required"), streamed and not, whose result goes
  back as a `tool` message before the final answer.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal, Optional

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.cluster import Cluster

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
Short = Annotated[str, Field(max_length=6)]  # short, so 50 samples generate quickly


class Address(BaseModel):
    city: Short
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):  # nested object, enum, optional field
    name: Short
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "editor", "viewer"]
    address: Address
    nickname: Optional[Short] = None


class ShoppingList(BaseModel):  # arrays of strings and of objects
    store: Short
    items: list[Short] = Field(min_length=1, max_length=3)


class Review(BaseModel):  # numbers and booleans
    stars: int = Field(ge=1, le=5)
    recommended: bool
    score: float = Field(ge=0, le=10)


class Event(BaseModel):  # an array of nested objects with optional fields
    title: Short
    attendees: list[Address] = Field(max_length=2)
    online: Optional[bool] = None


SCHEMAS: list[tuple[type[BaseModel], str]] = [
    (Person, "Describe a person as JSON."),
    (ShoppingList, "Write a shopping list as JSON."),
    (Review, "Review a restaurant as JSON."),
    (Event, "Describe an event as JSON."),
    (Person, "Invent a character as JSON."),
]
SAMPLES_PER_REQUEST = 10  # 5 requests x 10 = 50 samples

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def cluster(default_cluster: Cluster) -> Cluster:
    return default_cluster  # the session's (tests/conftest.py)


@pytest.fixture(scope="module")
def sdk(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_parse_returns_validated_objects_for_50_samples_at_temperature_1(sdk: openai.OpenAI) -> None:
    def parse(index: int) -> list:
        model, ask = SCHEMAS[index]
        completion = sdk.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": ask}], response_format=model,
            temperature=1.0, seed=1000 + index, n=SAMPLES_PER_REQUEST, max_tokens=200,
        )
        assert [c.finish_reason for c in completion.choices] == ["stop"] * SAMPLES_PER_REQUEST
        return [(model, c.message.parsed, c.message.content) for c in completion.choices]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        samples = [sample for batch in pool.map(parse, range(len(SCHEMAS))) for sample in batch]
    assert len(samples) == 50
    for model, parsed, content in samples:
        assert isinstance(parsed, model)  # the SDK validated it with pydantic
        assert model.model_validate_json(content) == parsed
    # Sampled, not one answer repeated: the seeds and forks gave different objects.
    assert len({content for _, _, content in samples}) > 25


def test_regex_and_choice_extensions_on_completions(sdk: openai.OpenAI) -> None:
    prompt = "My phone number is"
    regex = sdk.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=1.0, seed=3, n=5,
        extra_body={"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}},
    )
    assert all(re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", c.text) for c in regex.choices), [c.text for c in regex.choices]
    choices = ["positive", "negative", "neutral"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        answer = sdk.completions.create(
            model=MODEL, prompt="The sentiment of 'I love it' is", max_tokens=10, temperature=1.0, seed=4, n=5, extra_body=extra
        )
        assert all(c.text in choices and c.finish_reason == "stop" for c in answer.choices), [c.text for c in answer.choices]
    json_object = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A JSON object, please."}], max_tokens=40, temperature=0,
        response_format={"type": "json_object"},
    )
    if json_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_object.choices[0].message.content), dict)
    else:  # cut off by max_tokens: still a valid prefix of an object
        assert json_object.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"response_format": {"type": "json_object"}, "beam_width": 2}, "response_format"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(cluster: Cluster, body: dict, param: str) -> None:
    response = httpx.post(
        f"{cluster.base_url}/v1/chat/completions", timeout=120,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_forced_tool_calls_round_trip_streamed_and_not(sdk: openai.OpenAI) -> None:
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = sdk.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")

    # The SDK's own assistant message goes back as model_dump() makes it (content None,
    # tool_calls, and refusal / annotations / audio / function_call as null), then the result.
    messages += [choice.message.model_dump(),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    final = sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=40, temperature=0)
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")

    # Streamed, "required" with one call at most: the call's id and name come first, then
    # argument fragments that join into valid JSON.
    stream = sdk.chat.completions.create(
        model=MODEL, messages=messages[:1], tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True,
    )
    deltas, finish_reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish_reasons.append(c.finish_reason)
    assert finish_reasons[-1] == "tool_calls"
    assert deltas[0].id and deltas[0].function.name in ("get_weather", "get_time")
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments arrived in fragments
    streamed_arguments = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert isinstance(streamed_arguments, dict)
    required_props = {"get_weather": {"city", "unit"}, "get_time": {"zone"}}[deltas[0].function.name]
    assert required_props <= set(streamed_arguments)

    streamed_call = {"id": deltas[0].id, "type": "function",
                     "function": {"name": deltas[0].function.name, "arguments": json.dumps(streamed_arguments)}}
    messages = messages[:1] + [{"role": "assistant", "content": None, "tool_calls": [streamed_call]},
                               {"role": "tool", "tool_call_id": deltas[0].id, "content": "21 C, sunny"}]
    answer = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=40,
                                                 temperature=0, stream=True)
        if chunk.choices
    )
    assert answer.strip()


# Two calls in the Hermes syntax `auto` reads, forced by a regex so the model's choice to
# call (or not) does not decide what the test sees: the server's real output path
# (grammar mask in the executor, the gateway's parser, its streaming) is what is tested.
_WEATHER_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", "unit": "(celsius|fahrenheit)"\}\}</tool_call>'
_TIME_CALL = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "[A-Z]{3}"\}\}</tool_call>'


def test_auto_tool_calls_parallel_and_not_streamed_and_not(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What are the weather and the time in Paris?"}]
    two_calls = {"structured_outputs": {"regex": _WEATHER_CALL + "\n" + _TIME_CALL}}

    def create(kwargs: dict):  # auto is the default with tools; said here for the reader
        request = dict(model=MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="auto", max_tokens=100,
                       temperature=1.0, seed=5)
        response = sdk.chat.completions.create(**{**request, **kwargs})
        return list(response) if kwargs.get("stream") else response.choices[0]

    # Five requests at once (the server batches them): two calls whole and streamed, with
    # parallel_tool_calls false, no call written, and unconstrained.
    with ThreadPoolExecutor(5) as pool:
        whole, streamed, single, plain, free = pool.map(create, [
            {"extra_body": two_calls}, {"extra_body": two_calls, "stream": True},
            {"extra_body": two_calls, "parallel_tool_calls": False},
            {"extra_body": {"structured_outputs": {"regex": "It is sunny in Paris\\."}}}, {"max_tokens": 60},
        ])
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    assert [call.function.name for call in whole.message.tool_calls] == ["get_weather", "get_time"]
    weather, time = (json.loads(call.function.arguments) for call in whole.message.tool_calls)
    assert set(weather) == {"city", "unit"} and set(time) == {"zone"}
    assert len({call.id for call in whole.message.tool_calls}) == 2

    # Streamed: each call's id and name first, then its argument fragments, which join
    # into the same calls' JSON arguments. (Not compared with the whole response's text:
    # the same seed in a different batch may sample otherwise: bf16, and int4 weights for
    # small steps, are not batch-invariant.)
    calls: dict[int, dict] = {}
    finish_reasons = []
    for chunk in streamed:
        for c in chunk.choices:
            finish_reasons.append(c.finish_reason)
            for delta in c.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id and delta.function.name
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish_reasons[-1] == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert [set(json.loads(calls[i]["arguments"])) for i in sorted(calls)] == [{"city", "unit"}, {"zone"}]

    # parallel_tool_calls false: at most one call, whatever the model wrote.
    assert [call.function.name for call in single.message.tool_calls] == ["get_weather"]

    # No call written: plain content, finish_reason stop.
    assert (plain.message.content, plain.message.tool_calls, plain.finish_reason) == ("It is sunny in Paris.", None, "stop")

    # Unconstrained, the model may or may not call; either way the answer is consistent.
    if free.message.tool_calls:
        assert free.finish_reason == "tool_calls"
        for call in free.message.tool_calls:
            assert call.function.name in ("get_weather", "get_time")
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert free.message.content and free.finish_reason in ("stop", "length")


def test_prompt_logprobs_on_chat_completions(sdk: openai.OpenAI) -> None:
    """vLLM's `prompt_logprobs` on chat: response-level, one entry per templated prompt
    token (the first null), the token itself among each entry; in the first chunk when
    streamed. (Their values equal HF's: tests/engine/test_prompt_logprobs.py.)"""
    messages = [{"role": "user", "content": "Hi!"}]
    whole = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2})
    entries = whole.model_extra["prompt_logprobs"]
    assert len(entries) == whole.usage.prompt_tokens and entries[0] is None
    assert all(1 <= len(entry) <= 3 and all(v["logprob"] <= 0 for v in entry.values()) for entry in entries[1:])
    chunks = list(sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, temperature=0, stream=True, extra_body={"prompt_logprobs": 2},
    ))
    carrying = [chunk.model_extra.get("prompt_logprobs") for chunk in chunks if chunk.model_extra.get("prompt_logprobs")]
    assert carrying == [entries]
