"""GET /openapi.json: open like /health, generated from the request Structs (so it lists
exactly the fields the server accepts, with their bounds), and a JSON Schema validator
reading it agrees with the server about which bodies are acceptable."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.shared.sampling_bounds import MAX_BEAM_WIDTH, sampling_bounds
from tests.gateway.conftest import gateway_config, running_gateway
from tests.gateway.fake_scheduler import FakeScheduler

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def secured_url(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    with running_gateway(gateway_config(fake_scheduler, api_key="sk-openapi"), tokenizer) as url:
        yield url


@pytest.fixture(scope="module")
def document(secured_url: str) -> dict[str, Any]:
    response = httpx.get(f"{secured_url}/openapi.json", timeout=20)  # no Authorization header
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


def request_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"]
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]]


@pytest.mark.parametrize(("path", "struct"), [("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)])
def test_request_bodies_are_described_field_for_field(document: dict[str, Any], path: str, struct: type) -> None:
    schema = request_schema(document, path)
    assert set(schema["properties"]) == {field.encode_name for field in msgspec.structs.fields(struct)}
    assert schema["additionalProperties"] is False  # unknown fields are refused
    assert schema["required"] == (["prompt"] if struct is CompletionRequest else ["messages"])
    max_tokens = next(option for option in schema["properties"]["max_tokens"]["anyOf"] if option["type"] == "integer")
    # 0 only for completions, with echo (an if/then rule); chat needs at least 1.
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (0 if struct is CompletionRequest else 1, 2**31 - 1)
    timeout = next(option for option in schema["properties"]["timeout"]["anyOf"] if option["type"] == "number")
    assert timeout["exclusiveMinimum"] == 0
    operation = document["paths"][path]["post"]
    assert operation["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "413", "415", "504"} <= set(operation["responses"])
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    error_ref = operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref == "#/components/schemas/ErrorBody"


def number_option(prop: dict[str, Any]) -> dict[str, Any] | None:
    return next((option for option in prop.get("anyOf", [prop]) if option.get("type") in ("integer", "number")), None)


def test_every_bound_of_the_table_is_in_the_served_document(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    """shared/sampling_bounds.py's table, which SamplingParams.validate enforces
    (tests/shared/test_sampling_bounds.py), stated for each request field carrying it. A
    gateway whose --max-n does not cap beam_width below the table's, and a --max-logprobs
    of its own, which the table's logprobs bounds must follow."""
    config = gateway_config(fake_scheduler, max_n=MAX_BEAM_WIDTH, max_logprobs=9)
    with running_gateway(config, tokenizer) as url:
        served = httpx.get(f"{url}/openapi.json", timeout=20).json()["components"]["schemas"]
    checked = set()
    for bound in sampling_bounds(max_logprobs=9):
        for schema_name in ("CompletionRequest", "ChatCompletionRequest"):
            properties = served[schema_name]["properties"]
            for name in (bound.field, *bound.aliases):
                option = number_option(properties[name]) if name in properties else None
                if bound.each_value and name in properties:  # a mapping: the bound is on its values
                    option = next(o for o in properties[name]["anyOf"] if o.get("type") == "object")["additionalProperties"]
                if option is None:
                    continue  # not in this request, or another type there (chat's logprobs)
                expected = bound.json_schema()
                if (schema_name, name) == ("CompletionRequest", "max_tokens"):
                    expected["minimum"] = 0  # the one exception: echo alone (an if/then rule)
                assert {key: option.get(key) for key in expected} == expected, (schema_name, name, option)
                checked.add(bound.field)
    assert checked == {bound.field for bound in sampling_bounds()}, "a bound that no request field states"


def test_the_document_is_openapi_3_1_and_names_the_limits(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(document["paths"])
    description = document["paths"]["/v1/completions"]["post"]["description"]
    assert "At most 16 choices" in description and "1,048,576 bytes" in description and "600 s" in description
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


def test_an_open_gateway_declares_no_security(client: httpx.Client, scheduler: FakeScheduler) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/completions"]["post"]
    assert operation["security"] == []


def check_jsonschema() -> str:
    tool = REPO / ".venv-tools" / "bin" / "check-jsonschema"
    found = str(tool) if tool.exists() else shutil.which("check-jsonschema")
    if found is None:
        pytest.fail("check-jsonschema not found: run scripts/setup.sh (it installs it into .venv-tools)")
    return found


def test_a_json_schema_validator_agrees_with_the_server(
    document: dict[str, Any], secured_url: str, scheduler: FakeScheduler, tmp_path: Path
) -> None:
    schema_file = tmp_path / "completion-request.json"
    # The served components as a standalone JSON Schema: $refs point into "components".
    schema_file.write_text(json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "#/components/schemas/CompletionRequest",
        "components": document["components"],
    }))
    tool = check_jsonschema()
    metaschema = subprocess.run([tool, "--check-metaschema", str(schema_file)], capture_output=True, text=True, timeout=120)
    assert metaschema.returncode == 0, metaschema.stdout + metaschema.stderr
    bodies = {
        "valid": {"prompt": "p", "max_tokens": 2, "timeout": 5, "stop": ["x"]},
        "unknown-field": {"prompt": "p", "best_of": 2},
        "wrong-type": {"prompt": "p", "max_tokens": "two"},
        "out-of-range": {"prompt": "p", "timeout": 0},
        "missing-prompt": {"max_tokens": 2},
    }
    headers = {"Authorization": "Bearer sk-openapi"}
    for name, body in bodies.items():
        instance = tmp_path / f"{name}.json"
        instance.write_text(json.dumps(body))
        schema_says = subprocess.run([tool, "--schemafile", str(schema_file), str(instance)], capture_output=True, text=True, timeout=120)
        server_says = httpx.post(f"{secured_url}/v1/completions", json=body, headers=headers, timeout=20)
        assert (schema_says.returncode == 0) == (server_says.status_code == 200), (name, schema_says.stdout, server_says.text)
        assert (name == "valid") == (server_says.status_code == 200), (name, server_says.text)
