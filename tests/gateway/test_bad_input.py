"""Bad input, end to end: each case is one row of the "Bad input" table in docs/security.md (the test
checks the table says what the server does), then the HTTP-level abuse a JSON client
cannot produce: a body announced bigger than the limit (refused before it is sent), a
body that stops arriving (408, not a connection held for ever), a Content-Length no HTTP
parser accepts. Nothing here reaches the scheduler, and nothing is a 500."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from tests.gateway.conftest import gateway_config, running_gateway
from tests.gateway.fake_scheduler import FakeScheduler
from tests.gateway.test_validation import assert_openai_error

README = Path(__file__).resolve().parents[2] / "docs" / "security.md"  # the bad-input table
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
JSON = "application/json"


@dataclass
class BadInput:
    what: str  # the README row's first cell
    path: str
    content: bytes
    status: int
    code: str
    param: str | None = None
    content_type: str | None = JSON


def body(value: object) -> bytes:
    return json.dumps(value).encode()


USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CASES = [
    BadInput("malformed JSON", COMPLETIONS, b'{"prompt": "p",', 400, "invalid_json"),
    BadInput("`NaN` / `Infinity` literals", COMPLETIONS, b'{"prompt": "p", "temperature": NaN}', 400, "invalid_json"),
    BadInput("body not valid UTF-8", COMPLETIONS, b'{"prompt": "\xc3\x28"}', 400, "invalid_json"),
    BadInput("lone UTF-16 surrogate escape", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_json"),
    BadInput("empty body", COMPLETIONS, b"", 400, "invalid_json"),
    BadInput("JSON that is not an object", COMPLETIONS, b"null", 400, "invalid_type"),
    BadInput("wrong type for a field", COMPLETIONS, body({"prompt": "p", "max_tokens": "ten"}), 400, "invalid_type", "max_tokens"),
    BadInput("`null` for a field that takes none", COMPLETIONS, body({"prompt": "p", "n": None}), 400, "invalid_type", "n"),
    BadInput("nesting 10,000 deep", COMPLETIONS, b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "invalid_type", "prompt[0][0]"),
    BadInput("unknown field", COMPLETIONS, body({"prompt": "p", "best_of": 2}), 400, "unknown_parameter", "best_of"),
    BadInput("unknown nested field", CHAT, body({"messages": [{"role": "user", "content": "hi", "x": 1}]}), 400, "unknown_parameter", "messages[0].x"),
    BadInput("`prompt` sent to chat", CHAT, body({"prompt": "p"}), 400, "unknown_parameter", "prompt"),
    BadInput("missing `prompt`", COMPLETIONS, body({"max_tokens": 3}), 400, "missing_required_parameter", "prompt"),
    BadInput("negative `max_tokens`", COMPLETIONS, body({"prompt": "p", "max_tokens": -1}), 400, "invalid_value", "max_tokens"),
    BadInput("`max_tokens` beyond 32 bits", COMPLETIONS, body({"prompt": "p", "max_tokens": 10**30}), 400, "invalid_value", "max_tokens"),
    BadInput("`max_tokens` = 0", CHAT, body({"messages": USER, "max_tokens": 0}), 400, "invalid_value", "max_tokens"),
    BadInput("prompt as long as the context", COMPLETIONS, body({"prompt": [5] * 256, "max_tokens": 1}), 400, "context_length_exceeded", "prompt"),
    BadInput("conversation longer than the context", CHAT, body({"messages": [{"role": "user", "content": "word " * 400}]}), 400, "context_length_exceeded", "messages"),
    BadInput("`n` above `--max-n`", COMPLETIONS, body({"prompt": "p", "n": 17}), 400, "invalid_value", "n"),
    BadInput("prompts x `n` above `--max-n`", COMPLETIONS, body({"prompt": ["a"] * 100_000, "n": 1}), 400, "invalid_value", "n"),
    BadInput("empty prompt", COMPLETIONS, body({"prompt": ""}), 400, "invalid_value", "prompt"),
    BadInput("no messages", CHAT, body({"messages": []}), 400, "invalid_value", "messages"),
    BadInput("token id outside the vocabulary", COMPLETIONS, body({"prompt": [1, 10**7]}), 400, "invalid_value", "prompt"),
    BadInput("sampling value out of range", COMPLETIONS, body({"prompt": "p", "top_p": 1.5}), 400, "invalid_value", "top_p"),
    BadInput("`max_tokens` = 0 without `echo`", COMPLETIONS, body({"prompt": "p", "max_tokens": 0}), 400, "invalid_value", "max_tokens"),
    BadInput("`logit_bias` id outside the vocabulary", COMPLETIONS, body({"prompt": "p", "logit_bias": {"49152": 1}}), 400, "invalid_value", "logit_bias"),
    BadInput("`logit_bias` value outside [-100, 100]", COMPLETIONS, body({"prompt": "p", "logit_bias": {"5": -101}}), 400, "invalid_value", "logit_bias"),
    BadInput("`logit_bias` key not a token id", COMPLETIONS, body({"prompt": "p", "logit_bias": {"x": 1}}), 400, "invalid_type", "logit_bias"),
    BadInput("`logprobs` / `top_logprobs` / `prompt_logprobs` above `--max-logprobs`", COMPLETIONS, body({"prompt": "p", "prompt_logprobs": 21}), 400, "invalid_value", "prompt_logprobs"),
    BadInput("`top_logprobs` without `logprobs: true`", CHAT, body({"messages": USER, "top_logprobs": 2}), 400, "invalid_value", "top_logprobs"),
    BadInput("`prompt_logprobs`, `logit_bias` or `min_tokens` with beam search", COMPLETIONS, body({"prompt": "p", "beam_width": 2, "prompt_logprobs": 1}), 400, "invalid_value", "prompt_logprobs"),
    BadInput("`/tokenize` with both or neither of `prompt` and `messages`", "/tokenize", body({"prompt": "p", "messages": USER}), 400, "invalid_value", "prompt"),
    BadInput("`/detokenize` token id outside the vocabulary", "/detokenize", body({"tokens": [49152]}), 400, "invalid_value", "tokens"),
    BadInput("`beam_width` above `--max-n`", COMPLETIONS, body({"prompt": "p", "beam_width": 10**4}), 400, "invalid_value", "beam_width"),
    BadInput("`n` above `beam_width`", COMPLETIONS, body({"prompt": "p", "beam_width": 2, "n": 3}), 400, "invalid_value", "n"),
    BadInput("`timeout` above `--request-timeout`", COMPLETIONS, body({"prompt": "p", "timeout": 10**6}), 400, "invalid_value", "timeout"),
    BadInput("content part other than text", CHAT, body({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}), 400, "invalid_value", "messages[0].content[0].type"),
    BadInput("invalid JSON schema in `response_format`", CHAT, body({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}), 400, "invalid_grammar", "response_format.json_schema.schema"),
    BadInput("`response_format` of type `json_schema` without `json_schema`", CHAT, body({"messages": USER, "response_format": {"type": "json_schema"}}), 400, "invalid_value", "response_format.json_schema"),
    BadInput("invalid regex, choice list or grammar in `structured_outputs` / `guided_*`", COMPLETIONS, body({"prompt": "p", "structured_outputs": {"regex": "(unclosed"}}), 400, "invalid_grammar", "structured_outputs.regex"),
    BadInput("two output constraints", COMPLETIONS, body({"prompt": "p", "response_format": {"type": "json_object"}, "guided_regex": "a+"}), 400, "invalid_value", "guided_regex"),
    BadInput("an output constraint with beam search or `ignore_eos`", COMPLETIONS, body({"prompt": "p", "guided_choice": ["a"], "ignore_eos": True}), 400, "invalid_value", "ignore_eos"),
    BadInput("`tool_choice` without `tools`", CHAT, body({"messages": USER, "tool_choice": "required"}), 400, "invalid_value", "tool_choice"),
    BadInput("`tool_choice` naming an undeclared function", CHAT, body({"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}), 400, "invalid_value", "tool_choice"),
    BadInput("`tools` declaring a function twice", CHAT, body({"messages": USER, "tools": [TOOL, TOOL]}), 400, "invalid_value", "tools"),
    BadInput("function `parameters` not an object schema", CHAT, body({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}), 400, "invalid_value", "tools[0].function.parameters"),
    BadInput("unknown model", COMPLETIONS, body({"prompt": "p", "model": "gpt-9"}), 404, "model_not_found", "model"),
    BadInput("body over `--max-body-bytes`", COMPLETIONS, b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "request_too_large"),
    BadInput("Content-Type not JSON", COMPLETIONS, body({"prompt": "p"}), 415, "unsupported_media_type", content_type="text/plain"),
    BadInput("no Content-Type", COMPLETIONS, body({"prompt": "p"}), 415, "unsupported_media_type", content_type=None),
]


@pytest.mark.parametrize("case", CASES, ids=[case.what for case in CASES])
def test_bad_input_is_an_openai_error(client: httpx.Client, scheduler: FakeScheduler, case: BadInput) -> None:
    headers = {} if case.content_type is None else {"content-type": case.content_type}
    response = client.post(case.path, content=case.content, headers=headers)
    assert_openai_error(response, case.status, param=case.param, code=case.code)
    assert scheduler.submits == []


def test_the_readme_table_says_what_the_server_does() -> None:
    rows = {
        cells[0]: cells[1:]
        for line in README.read_text().splitlines()
        if line.startswith("| ") and len(cells := [cell.strip() for cell in line.strip("|").split("|")]) >= 3
    }
    for case in CASES:
        assert case.what in rows, f"README's bad-input table has no row {case.what!r}"
        assert rows[case.what][:2] == [str(case.status), f"`{case.code}`"], (case.what, rows[case.what])


# ------------------------------------------------------------------ below the JSON layer


def raw_exchange(base_url: str, request: bytes, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `request` bytes as they are (no client fixes them up) and read one response."""
    url = urlparse(base_url)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(status_line.split()[1]), headers, rest


def post_head(path: str, content_length: str, content_type: str = JSON) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode()


def test_an_announced_oversized_body_is_refused_before_it_is_sent(gateway_url: str, scheduler: FakeScheduler) -> None:
    started = time.monotonic()
    status, headers, content = raw_exchange(gateway_url, post_head(COMPLETIONS, str(50 << 20)))
    assert status == 413 and headers["content-type"] == JSON
    assert json.loads(content)["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 5  # answered without waiting for 50 MiB


def test_an_unparseable_content_length_is_a_400_from_the_http_server(gateway_url: str, scheduler: FakeScheduler) -> None:
    # uvicorn refuses this itself, before the app: the one 4xx that is plain text.
    status, _, _ = raw_exchange(gateway_url, post_head(COMPLETIONS, "9" * 5000))
    assert status == 400


@pytest.fixture(scope="module")
def quick_body_url(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    with running_gateway(gateway_config(fake_scheduler, body_timeout_s=0.5), tokenizer) as url:
        yield url


def test_a_body_that_stops_arriving_is_408(quick_body_url: str, scheduler: FakeScheduler) -> None:
    started = time.monotonic()
    status, _, content = raw_exchange(quick_body_url, post_head(COMPLETIONS, "100") + b'{"prompt": "p", ')
    assert status == 408
    error = json.loads(content)["error"]
    assert error["code"] == "request_timeout" and re.search(r"within 0\.5 s \(16 bytes received\)", error["message"])
    assert 0.5 <= time.monotonic() - started < 5
    assert scheduler.submits == []
