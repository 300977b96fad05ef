"""Hostile input (issue #26): requests built so that the gateway's work grows faster than
the request, or that got a 500 instead of a 4xx.

Work is measured in-process at two sizes and compared as a ratio, never against a
wall-clock bound: per-token (per-tool) work that is O(1) amortised keeps the ratio near 1
when the size grows 8x, quadratic work makes it near 8. Counts are exact (tokens handed to
the tokenizer); where only CPU time can tell, the best of a few rounds of `process_time`
is compared with a generous factor.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jsonschema  # schemathesis's dependency (the test extra): an independent validator
import msgspec
import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.detokenizer import IncrementalDetokenizer
from pagedserve.services.gateway.openai_protocol import ChatCompletionRequest, Tool
from pagedserve.services.gateway.tool_calls import ToolCallStream, ToolPlan, forced_grammar, parse_tool_calls, tool_plan
from tests.gateway.conftest import gateway_config, running_gateway
from tests.cluster import wait_until
from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step
from tests.gateway.test_bad_input import CHAT, COMPLETIONS, JSON, BadInput, body
from tests.gateway.test_validation import assert_openai_error

GROWTH = 8  # the larger size is this many times the smaller
LINEAR_FACTOR = 3.0  # per-unit cost may grow this much (noise); quadratic grows ~GROWTH


class _CountingTokenizer:
    """The real tokenizer, counting the token ids it is asked to decode."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self.decoded_tokens = 0

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        self.decoded_tokens += len(token_ids)
        return self._tokenizer.decode(token_ids, **kwargs)


def _decode_work_per_token(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> tuple[float, str]:
    counting = _CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting, [1, 2, 3])  # type: ignore[arg-type]
    text = "".join(detokenizer.push([token_id]) for token_id in token_ids) + detokenizer.flush()
    return counting.decoded_tokens / len(token_ids), text


@pytest.mark.parametrize(
    "token_id",
    [111, 0],  # 111: a lone UTF-8 continuation byte (U+FFFD forever); 0: a special token (decodes to "")
)
def test_detokenizer_work_per_token_does_not_grow_while_tokens_decode_to_nothing_complete(
    tokenizer: PreTrainedTokenizerBase, token_id: int
) -> None:
    # The repro: logit_bias {"111": 100}, max_tokens 8000 re-decoded a window as
    # long as the output for every token (1.8 s of event loop per choice at 4k tokens).
    short = 500
    work_short, text_short = _decode_work_per_token(tokenizer, [token_id] * short)
    work_long, text_long = _decode_work_per_token(tokenizer, [token_id] * (short * GROWTH))
    assert work_long < work_short * LINEAR_FACTOR, (work_short, work_long)
    assert work_long < 64, work_long  # a handful of tokens decoded per token, whatever the length
    # The text released early is still the text the tokens decode to.
    reference = tokenizer.decode([token_id] * (short * GROWTH), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert text_long == reference
    assert text_short == tokenizer.decode([token_id] * short, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_a_character_split_across_tokens_after_a_run_of_broken_bytes_still_comes_out_whole(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    emoji_ids = tokenizer("🎉🚀 fin").input_ids
    assert len(emoji_ids) >= 4, "the test needs a character split across tokens"
    token_ids = [111] * 40 + emoji_ids
    _, text = _decode_work_per_token(tokenizer, token_ids)
    assert text == "\ufffd" * 40 + "🎉🚀 fin"


def _best_cpu_seconds(work: Callable[[], object], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


_TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def _plan(mode: str, tools: list[dict] | None = None) -> ToolPlan:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools or _TOOLS}
    if mode == "named":
        body["tool_choice"] = {"type": "function", "function": {"name": "add"}}
    else:
        body["tool_choice"] = mode
    plan = tool_plan(msgspec.convert(body, ChatCompletionRequest))
    assert plan is not None
    return plan


def _output(mode: str, argument_chars: int) -> str:
    arguments = '{"a": "' + "x" * argument_chars + '", "b": [1, {"c": "}"}]}'
    if mode == "named":
        return arguments
    if mode == "required":
        return '[{"name": "add", "arguments": ' + arguments + "}]"
    return 'Sure. <tool_call>\n{"name": "add", "arguments": ' + arguments + "}\n</tool_call>"


@pytest.mark.parametrize("mode", ["auto", "required", "named"])
def test_streamed_tool_call_work_per_chunk_does_not_grow_with_the_text(mode: str) -> None:
    # One chunk per 4 characters, as tokens come: re-parsing the whole text per chunk made
    # this quadratic.
    plan = _plan(mode)

    def stream(argument_chars: int) -> Callable[[], None]:
        text = _output(mode, argument_chars)
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]

        def run() -> None:
            tool_stream = ToolCallStream(plan)
            sent = ""
            for k, piece in enumerate(pieces):
                _, deltas = tool_stream.update(piece, final=k == len(pieces) - 1)
                sent += "".join(d.function.arguments or "" for d in deltas)
            # Streamed fragments add up to the whole output's arguments.
            _, calls = parse_tool_calls(plan, text)
            assert sent == calls[0].function.arguments

        return run

    short = 4000
    per_char_short = _best_cpu_seconds(stream(short)) / short
    per_char_long = _best_cpu_seconds(stream(short * GROWTH)) / (short * GROWTH)
    assert per_char_long < per_char_short * LINEAR_FACTOR, (per_char_short, per_char_long)


def test_many_parallel_tool_calls_streamed_cost_o1_per_call() -> None:
    # Settled calls are not revisited: 8x the calls costs ~8x, not ~64x.
    plan = _plan("auto")

    def stream(num_calls: int) -> Callable[[], None]:
        text = "".join('<tool_call>{"name": "add", "arguments": {"a": %d}}</tool_call>' % i for i in range(num_calls))
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]

        def run() -> None:
            tool_stream = ToolCallStream(plan)
            indices = set()
            for k, piece in enumerate(pieces):
                for delta in tool_stream.update(piece, final=k == len(pieces) - 1)[1]:
                    indices.add(delta.index)
            assert indices == set(range(num_calls))

        return run

    short = 200
    per_call_short = _best_cpu_seconds(stream(short)) / short
    per_call_long = _best_cpu_seconds(stream(short * GROWTH)) / (short * GROWTH)
    assert per_call_long < per_call_short * LINEAR_FACTOR, (per_call_short, per_call_long)


def test_the_duplicate_tool_name_check_is_linear_in_the_number_of_tools() -> None:
    # HTTP bodies now hold at most 128 tools; the check itself must not be what bounds it.
    def check(num_tools: int) -> Callable[[], None]:
        tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(num_tools)]
        body = msgspec.convert({"messages": [{"role": "user", "content": "hi"}]}, ChatCompletionRequest)
        body.tools = msgspec.convert(tools, list[Tool])
        return lambda: tool_plan(body)

    short = 2000
    per_tool_short = _best_cpu_seconds(check(short)) / short
    per_tool_long = _best_cpu_seconds(check(short * GROWTH)) / (short * GROWTH)
    assert per_tool_long < per_tool_short * LINEAR_FACTOR, (per_tool_short, per_tool_long)


# ------------------------------------------------------------------ bounded lists, over HTTP

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# The fake scheduler's context (256 tokens) x the longest token's bytes (81) is 20,736 bytes.
TOO_MANY_BYTES = 21_000


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _nested_schema_text(depth: int) -> str:
    """The JSON text of `_nested_schema(depth)`, written out (json.dumps recurses)."""
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "object"}' + "}}" * depth


HOSTILE = [
    BadInput("`stop_token_ids` longer than 64", COMPLETIONS, body({"prompt": "p", "stop_token_ids": [5] * 65}), 400, "invalid_value", "stop_token_ids"),
    BadInput("a stop string over 256 characters", COMPLETIONS, body({"prompt": "p", "stop": ["x" * 257]}), 400, "invalid_value", "stop[0]"),
    BadInput(
        "more than 128 `tools`", CHAT,
        body({"messages": USER, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}),
        400, "invalid_value", "tools",
    ),
    BadInput("more than 2,048 `messages`", CHAT, body({"messages": USER * 2049}), 400, "invalid_value", "messages"),
    BadInput(
        "a JSON schema nested 1,000 deep", CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
        + _nested_schema_text(1000).encode() + b"}}}",
        400, "invalid_value",
    ),
    BadInput(
        "a JSON schema nested more than 128 deep", CHAT,
        body({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested_schema(100)}}}),
        400, "invalid_value", "response_format.json_schema.schema",
    ),
    BadInput(
        "a JSON schema nested more than 128 deep", COMPLETIONS,
        body({"prompt": "p", "guided_json": _nested_schema_text(3000)}), 400, "invalid_value", "guided_json",
    ),
    BadInput(
        "a JSON schema nested more than 128 deep", CHAT,
        body({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": _nested_schema(100)}}]}),
        400, "invalid_value", "tools[0].function.parameters",
    ),
    BadInput(
        "a schema the grammar library's error echoes at length", CHAT,
        body({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "x" * 100_000}}}}),
        400, "invalid_grammar", "response_format.json_schema.schema",
    ),
    BadInput("`priority` without `--scheduling-policy priority`", CHAT, body({"messages": USER, "priority": -(2**31)}), 400, "invalid_value", "priority"),
    BadInput("`cache_salt` empty or over 256 characters", COMPLETIONS, body({"prompt": "p", "cache_salt": ""}), 400, "invalid_value", "cache_salt"),
    BadInput(
        "prompt text longer in bytes than the context can hold", COMPLETIONS,
        body({"prompt": "a" * TOO_MANY_BYTES}), 400, "context_length_exceeded", "prompt",
    ),
    BadInput(
        "messages longer in bytes than the context can hold", CHAT,
        body({"messages": [{"role": "user", "content": "a" * TOO_MANY_BYTES}]}), 400, "context_length_exceeded", "messages",
    ),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[f"{case.what} ({case.param})" for case in HOSTILE])
def test_hostile_input_is_an_openai_error(client: httpx.Client, scheduler: FakeScheduler, case: BadInput) -> None:
    response = client.post(case.path, content=case.content, headers={"content-type": JSON})
    error = assert_openai_error(response, case.status, param=case.param, code=case.code)
    assert scheduler.submits == []
    if "in bytes" in case.what:
        # Refused on its byte count, before the tokenizer ran over it.
        assert "bytes of text" in error["message"], error


def test_the_security_doc_lists_every_hostile_input() -> None:
    rows = {
        cells[0]: cells[1:]
        for line in SECURITY_DOC.read_text().splitlines()
        if line.startswith("| ") and len(cells := [cell.strip() for cell in line.strip("|").split("|")]) >= 3
    }
    for case in HOSTILE:
        assert case.what in rows, f"docs/security.md's bad-input table has no row {case.what!r}"
        assert rows[case.what][:2] == [str(case.status), f"`{case.code}`"], (case.what, rows[case.what])


def test_a_long_grammar_error_leaves_the_checker_answering_the_next_request_right(client: httpx.Client, scheduler: FakeScheduler) -> None:
    # The checker's reply to the first was over 64 KiB: a 500, and its tail was read as
    # the answer to the next constrained request, whoever sent it.
    long_error = {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "y" * 100_000}}}}
    first = assert_openai_error(client.post(CHAT, json=long_error), 400, "response_format.json_schema.schema", "invalid_grammar")
    assert len(first["message"]) < 5000, len(first["message"])
    other = {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}
    second = assert_openai_error(client.post(CHAT, json=other), 400, "response_format.json_schema.schema", "invalid_grammar")
    assert "frobnicate" in second["message"] and "yyyy" not in second["message"], second
    valid = {"messages": USER, "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    assert client.post(CHAT, json=valid).status_code == 200


def test_tool_choice_required_keeps_each_function_s_own_definitions() -> None:
    # Two functions each define `Item`; merging their $defs made the last one's `Item`
    # constrain both functions' arguments.
    tools = [
        {"type": "function", "function": {"name": "order", "parameters": {
            "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
            "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "integer"}}, "required": ["sku"]}},
        }}},
        {"type": "function", "function": {"name": "tag", "parameters": {
            "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
            "$defs": {"Item": {"type": "string"}},
        }}},
    ]
    grammar = forced_grammar(_plan("required", tools))
    assert grammar is not None
    schema = json.loads(grammar.source)
    valid = [{"name": "order", "arguments": {"item": {"sku": 7}}}, {"name": "tag", "arguments": {"item": "blue"}}]
    jsonschema.validate(valid, schema)
    for wrong in ([{"name": "order", "arguments": {"item": "blue"}}], [{"name": "tag", "arguments": {"item": {"sku": 7}}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_priority_reaches_the_scheduler_only_under_the_priority_policy(
    fake_scheduler: FakeScheduler, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase
) -> None:
    with running_gateway(gateway_config(fake_scheduler, scheduling_policy="priority"), tokenizer) as url:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "priority": -7}, timeout=20)
    assert response.status_code == 200, response.text
    assert [submit.priority for submit in scheduler.submits] == [-7]


# ------------------------------------------------------------------ a client that stops reading


def test_a_streaming_client_that_stops_reading_is_cut_off_and_its_request_aborted(
    fake_scheduler: FakeScheduler, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase
) -> None:
    # uvicorn's send blocked for ever once the socket's buffers were full: the request ran
    # on (its deadline was never checked there) and its tokens piled up in the gateway.
    scheduler.script = one_token_per_step([5] * 50_000)  # ~100 s of tokens at the fake's pace
    with running_gateway(gateway_config(fake_scheduler, stream_write_timeout_s=1.0), tokenizer) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": [5, 6], "max_tokens": 50_000, "n": 4, "logprobs": 5, "stream": True}).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            client.connect((host, int(port)))
            client.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            # Read nothing: the gateway must give up on us and abort the request.
            wait_until(lambda: len(scheduler.submits) == 1, 30, "the request to reach the scheduler")
            request_id = scheduler.submits[0].request_id
            wait_until(lambda: request_id in scheduler.aborted, 60, "the gateway to abort the unread stream")
