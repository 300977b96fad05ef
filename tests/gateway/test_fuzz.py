"""Fuzzing the gateway with hypothesis (against the fake scheduler, so hundreds of
requests take seconds): bodies built from the gateway's own OpenAPI schema (realistic
bodies, such bodies with one field wild, bodies with every field anywhere in its declared
range or past its bounds or of any JSON type, unknown fields), bytes that are not JSON
and mangled valid bodies, random methods on random paths.

Whatever arrives: never a 5xx (the one exception, a 504 `timeout`, needs the body to have
asked for a deadline), every 4xx is an OpenAI error body, every 200 stream is well-formed
SSE ending in [DONE], and afterwards the gateway is healthy and serves a valid request.
"""

from __future__ import annotations

import json
import string
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.config import GatewayConfig
from pagedserve.services.gateway.openapi import openapi_document
from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step
from tests.gateway.sse import sse_events
from tests.gateway.test_validation import assert_openai_error

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
SCHEMAS: dict[str, Any] = openapi_document(GatewayConfig())["components"]["schemas"]
GENERATED = "Fuzz: ünïcode 🎉 text\nover lines."

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


# Realistic values for fields whose whole range would nearly always be refused, so that
# "tame" bodies mostly reach the (fake) scheduler and exercise generation and streaming.
TAME: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([None, "SmolLM2-135M-Instruct"]),
    "max_tokens": st.none() | st.integers(1, 8),
    "max_completion_tokens": st.none() | st.integers(1, 8),
    "n": st.integers(1, 3),
    "logprobs": st.none() | st.integers(0, 5),
    "top_logprobs": st.none() | st.integers(0, 5),
    "top_k": st.none() | st.integers(-1, 50),
    "seed": st.none() | st.integers(0, 2**63 - 1),
    "timeout": st.none() | st.sampled_from([5.0, 60]),
    "prompt": st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 49151), min_size=1, max_size=8),
    "stop_token_ids": st.none() | st.lists(st.integers(0, 49151), max_size=3),
    "stream_options": st.none(),
}


def from_schema(schema: dict[str, Any], *, tame: bool) -> st.SearchStrategy[Any]:
    """Values of the type `schema` declares: realistic ones when `tame`, else anywhere in
    the declared range, favouring its bounds and just past them."""
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(SCHEMAS[schema["$ref"].rsplit("/", 1)[1]], tame=tame))
    if "anyOf" in schema:
        return st.one_of([from_schema(option, tame=tame) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) if tame else st.sampled_from(schema["enum"]) | st.text(max_size=10)
    kind = schema.get("type")
    if kind == "integer":
        low, high = schema.get("minimum", -(2**63)), schema.get("maximum", 2**63)
        if tame:
            return st.integers(max(low, 0), min(high, 20))
        return st.sampled_from([low, high, low - 1, high + 1, 0, 1, 16, 17, 256]) | st.integers(min_value=low, max_value=high)
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1e9))
        high = schema.get("maximum", 1e9)
        if tame:
            return st.floats(min_value=max(low, 0.0), max_value=min(high, 1.0), exclude_min="exclusiveMinimum" in schema)
        return st.sampled_from([low, high, 0.0, 1e-300, 0.5, -0.0, -1.0, 1e308]) | st.floats(min_value=low, max_value=high)
    if kind == "string":
        return st.text(max_size=30) | st.sampled_from(["", "hi", "user", "text"])
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), tame=tame), max_size=4)
    if kind == "object":
        properties = {name: field_value(name, sub, tame=tame) for name, sub in schema.get("properties", {}).items()}
        required = {name: properties.pop(name) for name in schema.get("required", [])}
        return st.fixed_dictionaries(required, optional=properties)
    return ANY_JSON


def field_value(name: str, schema: dict[str, Any], *, tame: bool) -> st.SearchStrategy[Any]:
    if tame:
        return TAME.get(name, from_schema(schema, tame=True))
    return st.one_of(from_schema(schema, tame=False), from_schema(schema, tame=False), ANY_JSON)  # sometimes anything


def request_bodies(struct_name: str) -> st.SearchStrategy[dict[str, Any]]:
    schema = SCHEMAS[struct_name]
    properties = schema["properties"]
    tame = from_schema(schema, tame=True)
    one_wild_field = st.sampled_from(sorted(properties)).flatmap(
        lambda name: st.fixed_dictionaries({name: field_value(name, properties[name], tame=False)})
    )
    unknown_field = st.dictionaries(
        st.sampled_from(["logit_bias", "tools", "echo", "beam_width", "best_of"]) | st.text(max_size=8), ANY_JSON, min_size=1, max_size=1
    )
    return st.one_of(
        tame,
        st.builds(lambda body, wild: {**body, **wild}, tame, one_wild_field),
        from_schema(schema, tame=False),
        st.builds(lambda body, extra: {**extra, **body}, tame, unknown_field),
        st.dictionaries(st.sampled_from(sorted(properties)), ANY_JSON, max_size=6),
    )


def check_response(response: httpx.Response, sent: Any = None) -> None:
    status = response.status_code
    if status == 504 and isinstance(sent, dict) and "timeout" in sent:
        assert_openai_error(response, 504, code="timeout")  # a deadline the body asked for passed
        return
    assert status < 500, f"{status} for {sent!r}: {response.text[:500]}"
    if status >= 400:
        assert_openai_error(response, status)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = sse_events(response.text)
        errors = [event for event in events if "error" in event]
        assert all(set(event) == {"error"} for event in errors), errors
    else:
        assert status == 200 and "choices" in response.json(), response.text[:500]


def assert_healthy(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    assert client.get("/health").status_code == 200
    scheduler.reset()
    scheduler.script = one_token_per_step(tokenizer(" still fine").input_ids)
    response = client.post(COMPLETIONS, json={"prompt": "p", "max_tokens": 8})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == " still fine", response.text


@FUZZ
@given(body=request_bodies("CompletionRequest"))
def test_fuzzed_completion_bodies(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase, body: dict[str, Any]) -> None:
    scheduler.script = one_token_per_step(tokenizer(GENERATED).input_ids)  # detokenizer, stop strings, logprobs
    check_response(client.post(COMPLETIONS, json=body), body)


@FUZZ
@given(body=request_bodies("ChatCompletionRequest"))
def test_fuzzed_chat_bodies(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase, body: dict[str, Any]) -> None:
    scheduler.script = one_token_per_step(tokenizer(GENERATED).input_ids)  # detokenizer, stop strings, logprobs
    check_response(client.post(CHAT, json=body), body)


def test_fuzzing_left_the_gateway_healthy(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    # Also checked after each byte-level test below; this one follows the body fuzzing.
    assert_healthy(client, scheduler, tokenizer)


CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded", ""])
VALID_BODIES = [b'{"prompt": "p", "max_tokens": 2}', b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true}']


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A valid body with a few bytes replaced, inserted or cut."""
    data = bytearray(draw(st.sampled_from(VALID_BODIES)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "cut"]))
        byte = draw(st.integers(0, 255))
        if action == "replace" and position < len(data):
            data[position] = byte
        elif action == "insert":
            data.insert(position, byte)
        else:
            del data[position:]
    return bytes(data)


@FUZZ
@given(path=st.sampled_from([COMPLETIONS, CHAT]), content=st.binary(max_size=2048) | mangled(), content_type=CONTENT_TYPES)
def test_fuzzed_bytes(
    client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase, path: str, content: bytes, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(path, content=content, headers=headers)
    try:
        sent = json.loads(content)
    except ValueError:
        sent = content
    check_response(response, sent)


@settings(FUZZ, max_examples=100)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/admin", "/admin/scheduler", "/openapi.json", "/"])
    | st.text(alphabet=string.ascii_letters + string.digits + "/-_.", max_size=30).map(lambda p: "/" + p),
)
def test_fuzzed_routes(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase, method: str, path: str) -> None:
    response = client.request(method, path, content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code < 500 or (path == "/health" and response.status_code == 503), (method, path, response.status_code)
    if response.status_code >= 400 and path != "/health" and method != "HEAD":
        assert_openai_error(response, response.status_code)


def test_fuzzing_bytes_and_routes_left_the_gateway_healthy(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    assert_healthy(client, scheduler, tokenizer)
