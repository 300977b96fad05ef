"""A bounded run of the third-party fuzzer schemathesis (`schemathesis run URL -c all`)
against a real gateway (uvicorn, real tokenizer) in front of the fake scheduler, as
tests/gateway/test_fuzz.py runs hypothesis: every check passes: no 5xx, every response
matches the document, every request the document calls invalid is refused.

`positive_data_acceptance` is left out of the bounded run: the document states every
bound and cross-field rule JSON Schema can say (logprobs <= max_logprobs, top_logprobs
only with logprobs, max_tokens 0 only with echo, beam search's exclusions, non-empty
prompts), but three rules it cannot, and schemathesis finds them within seconds: a
prompt's tokens plus max_tokens within the context length, token ids below the
vocabulary size, and integers written as floats (461.0 is a JSON-Schema integer, msgspec
refuses it). `test_document_states_the_bounds_found_before` pins the two it once found.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_document_states_the_bounds_found_before() -> None:
    """schemathesis once found `logprobs` above 20 and `top_logprobs` without
    `logprobs: true` refused though the document allowed them: it now says both."""
    from services.gateway.config import GatewayConfig
    from services.gateway.openapi import openapi_document

    schemas = openapi_document(GatewayConfig(max_logprobs=7))["components"]["schemas"]
    logprobs = schemas["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0]
    assert logprobs["maximum"] == 7
    top = schemas["ChatCompletionRequest"]["properties"]["top_logprobs"]["anyOf"][0]
    assert top["maximum"] == 7
    rule = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}
    assert rule in schemas["ChatCompletionRequest"]["allOf"]
