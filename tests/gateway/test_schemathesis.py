"""A bounded run of the third-party fuzzer schemathesis (`schemathesis run URL -c all`)
against a real gateway (uvicorn, real tokenizer) in front of the fake scheduler, as
tests/gateway/test_fuzz.py runs hypothesis: every check passes: no 5xx, every response
matches the document, every request the document calls invalid is refused.

The document a running server serves states what the served model bounds (token ids
below its vocabulary size, a token-id prompt shorter than its context), the prompt's
shapes, and every rule across fields that JSON Schema can say as an if/then clause.
Integral floats (`461.0`) are accepted for integer fields, as OpenAI (pydantic) accepts
them, and a `max_tokens` beyond the context's room is not refused (the completion ends
at the context), so those rules no longer reject schema-valid requests.

`positive_data_acceptance` is still left out of the bounded run: a few rules cannot be
written in JSON Schema and schemathesis finds them within seconds: a grammar (regex,
EBNF, JSON schema) must compile; at most one output constraint per request; prompts x n
within --max-n; n at most beam_width; a named tool_choice among the declared tools; a
text prompt's tokens within the context. Each is stated in its field's description
(and one if/then clause per value would make schemathesis's generator give up on the
schema). `test_document_states_the_bounds_found_before` pins what it found before.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
from transformers import PreTrainedTokenizerBase

from tests.gateway.conftest import gateway_config, running_gateway
from tests.gateway.fake_scheduler import FakeScheduler

API_KEY = "fuzz-key"
MAX_EXAMPLES = 8


def test_schemathesis_finds_nothing(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    fake_scheduler.reset()
    schemathesis = Path(sys.executable).with_name("schemathesis")
    config = gateway_config(fake_scheduler, api_key=API_KEY)
    with running_gateway(config, tokenizer) as url:
        run = subprocess.run(
            [
                str(schemathesis), "run", f"{url}/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                "--max-examples", str(MAX_EXAMPLES), "--seed", "15", "--workers", "1",
                "--header", f"Authorization: Bearer {API_KEY}", "--generation-database", ":memory:",
                "--request-timeout", "30",
            ],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]


def test_document_states_the_bounds_found_before(client: httpx.Client, scheduler: FakeScheduler) -> None:
    """schemathesis once found these refused though the document allowed them: `logprobs`
    above 20, `top_logprobs` without `logprobs: true`, token ids beyond the vocabulary,
    integers written as floats, a prompt mixing strings and token ids, non-text content
    parts, `tool_choice` without tools. The document now says each, or the server takes it."""
    from pagedserve.services.gateway.config import GatewayConfig
    from pagedserve.services.gateway.openapi import openapi_document

    served = client.get("/openapi.json").json()["components"]["schemas"]
    detokenize = served["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert detokenize["maximum"] == 49151  # the served model's vocabulary, learned at start
    prompt_options = served["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert [option.get("items", {}).get("type") for option in prompt_options] == [None, "string", "integer", "array"]
    assert prompt_options[2]["maxItems"] == scheduler.max_model_len - 1
    logit_bias = next(o for o in served["CompletionRequest"]["properties"]["logit_bias"]["anyOf"] if o.get("type") == "object")
    assert re.fullmatch(logit_bias["propertyNames"]["pattern"][1:-1], "49151") and not re.fullmatch(logit_bias["propertyNames"]["pattern"][1:-1], "49152")
    assert served["ContentPart"]["properties"]["type"] == {"enum": ["text"]}
    # 461.0 is an integer to JSON Schema, and to OpenAI; 461.5 is not.
    taken = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 3.0, "n": 1.0, "logit_bias": {"5": 2}})
    assert taken.status_code == 200, taken.text
    assert scheduler.submits[-1].sampling_params.max_tokens == 3
    refused = client.post("/v1/completions", json={"prompt": "p", "max_tokens": 3.5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"

    schemas = openapi_document(GatewayConfig(max_logprobs=7))["components"]["schemas"]
    logprobs = schemas["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0]
    assert logprobs["maximum"] == 7
    top = schemas["ChatCompletionRequest"]["properties"]["top_logprobs"]["anyOf"][0]
    assert top["maximum"] == 7
    rule = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}
    assert rule in schemas["ChatCompletionRequest"]["allOf"]
