"""Tool calling: what a request's `tools` / `tool_choice` ask for, the grammar that forces
a call, and the model's output parsed into OpenAI `tool_calls`, whole or streamed.

Three output shapes, one per mode (vLLM's choices, so clients see the same behaviour):
- `auto`: free text in the chat template's tool syntax (Hermes: `<tool_call>{"name":
  ..., "arguments": {...}}</tool_call>`, see `chat_template.py`); the text before the
  first call is the message content. Nothing forces a call; one that does not parse
  stays content. With `parallel_tool_calls` false only the first call is returned.
- `required`: the structured-output mask forces a JSON array of `{"name", "arguments"}`
  objects, each naming a declared function with arguments valid for its schema (at
  most one when `parallel_tool_calls` is false).
- a named function: the mask forces that function's arguments object; the output is
  the arguments.
`none` renders no tools and parses nothing.

Streaming follows OpenAI: a call's first chunk carries its index, id, type and name;
the following ones append fragments of its `arguments` string. Fragments are slices of
the model's own text (the arguments value as it was generated), so the concatenated
fragments equal the non-streamed `arguments` exactly: both come from one parser,
`_OutputParser`, fed the whole text at once or piece by piece. It resumes where it
stopped and keeps the calls it has settled, so a streamed choice costs O(its length) in
all, not O(length²) as re-parsing the text for every chunk did.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from pagedserve.services.gateway.errors import invalid_request
from pagedserve.services.gateway.response_format import check_schema_depth
from pagedserve.services.gateway.openai_protocol import (
    ChatCompletionRequest,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from pagedserve.shared.structured_output import GrammarSpec

ToolMode = Literal["none", "auto", "required", "named"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# An object's "name" then its "arguments" (or vLLM's "parameters"), up to the value.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode
    tools: list[Tool]
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def render_tools(self) -> bool:
        return self.mode != "none" and bool(self.tools)


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool use, validated (400 naming the field); None without tools."""
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise invalid_request("tool_choice needs tools: no tools were given", "tool_choice")
        return None
    names = [tool.function.name for tool in tools]
    # A Counter, not names.count per name: that was quadratic (16k tools: 2.5 s of event loop).
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise invalid_request(f"tools declare the function {duplicates[0]!r} more than once", "tools")
    for i, tool in enumerate(tools):
        parameters = tool.function.parameters
        if parameters is not None and parameters.get("type", "object") != "object":
            raise invalid_request("a function's parameters must be a JSON schema of type object", f"tools[{i}].function.parameters")
        if parameters is not None:
            check_schema_depth(parameters, f"tools[{i}].function.parameters")
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise invalid_request(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools ({', '.join(names)})",
                "tool_choice",
            )
        return ToolPlan("named", tools, choice.function.name, parallel)
    return ToolPlan(choice or "auto", tools, None, parallel)


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def forced_grammar(plan: ToolPlan) -> GrammarSpec | None:
    """The grammar that makes `required` and a named function certain to parse."""
    if plan.mode == "named":
        tool = next(t for t in plan.tools if t.function.name == plan.name)
        return GrammarSpec("json_schema", json.dumps(_parameters(tool)))
    if plan.mode != "required":
        return None
    # $refs in a function's schema point at its own root ("#/$defs/X"): lift every
    # function's $defs to the array schema's root so they still resolve, each under a
    # name of its own ("tool3_X"): two functions' `Item`s are different definitions (one
    # dict merged them, the last winning for every function).
    definitions: dict[str, Any] = {}
    variants = []
    for index, tool in enumerate(plan.tools):
        prefix = f"tool{index}_"
        parameters = _prefixed_refs(_parameters(tool), prefix)
        for name, definition in parameters.pop("$defs", {}).items():
            definitions[prefix + name] = definition
        variants.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "arguments": parameters},
            "required": ["name", "arguments"],
        })
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": variants}, "minItems": 1}
    if not plan.parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return GrammarSpec("json_schema", json.dumps(schema))


_DEFS_REF = "#/$defs/"


def _prefixed_refs(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of `schema` whose "#/$defs/X" references read "#/$defs/{prefix}X"
    (iterative: the schema's depth was bounded, but not to Python's stack)."""
    root = dict(schema)
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, dict):
                value = node[key] = dict(value)
                ref = value.get("$ref")
                if isinstance(ref, str) and ref.startswith(_DEFS_REF):
                    value["$ref"] = _DEFS_REF + prefix + ref[len(_DEFS_REF) :]
                stack.append(value)
            elif isinstance(value, list):
                node[key] = list(value)
                stack.append(node[key])
    ref = root.get("$ref")
    if isinstance(ref, str) and ref.startswith(_DEFS_REF):
        root["$ref"] = _DEFS_REF + prefix + ref[len(_DEFS_REF) :]
    return root


@dataclass
class _CallView:
    name: str | None
    arguments_start: int  # the arguments are text[arguments_start:arguments_end] ...
    arguments_end: int  # (grows only, as the text grows)
    complete: bool
    literal: str | None = None  # ... or this, re-serialized from a block in another key order

    def arguments(self, text: str) -> str:
        return self.literal if self.literal is not None else text[self.arguments_start : self.arguments_end]


MAX_CALL_HEAD_CHARS = 4096  # a call's `{"name": ..., "arguments":` head longer than this is not read as one
_STRUCTURAL = re.compile(r'[{}\[\]"]')
_IN_STRING = re.compile(r'["\\]')
_NON_SPACE = re.compile(r"\S")


class _JsonValueEnd:
    """Where the JSON object or array starting at text[start] ends, scanned once: each call
    resumes where the last stopped, so a value streamed in n pieces costs O(its length)."""

    def __init__(self, start: int) -> None:
        self._position = start
        self._depth = 0
        self._in_string = False
        self.end: int | None = None
        self.is_container: bool | None = None  # None until text[start] exists

    def advance(self, text: str) -> int | None:
        """Index just past the value, None while it is incomplete (or not an object or array)."""
        if self.end is not None or self.is_container is False:
            return self.end
        if self.is_container is None:
            if self._position >= len(text):
                return None
            self.is_container = text[self._position] in "{["
            if not self.is_container:
                return None
        while True:
            pattern = _IN_STRING if self._in_string else _STRUCTURAL
            found = pattern.search(text, self._position)
            if found is None:
                self._position = len(text)
                return None
            char, i = found.group(), found.start()
            if self._in_string:
                if char == "\\":
                    if i + 1 >= len(text):  # the escaped character has not arrived yet
                        self._position = i
                        return None
                    self._position = i + 2
                    continue
                self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.end = i + 1
                    return self.end
            self._position = i + 1


class _CallParser:
    """One call object starting at text[start], read as the text grows.

    The head is accepted only once a character follows it, so that whitespace still to
    come cannot move where the arguments start: the result never depends on how the
    text was cut into pieces."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._head: re.Match[str] | None = None
        self._name: str | None = None
        self._arguments: _JsonValueEnd | None = None
        self._close_from = 0  # where the search for the object's "}" resumes
        self._close: int | None = None

    def view(self, text: str, end: int | None, final: bool) -> tuple[_CallView | None, int]:
        """The call's view, and the index past it (past the arguments while it is
        incomplete); `end` is where its block ends, when known."""
        if self._head is None:
            head = _CALL_HEAD.match(text, self.start, min(len(text), self.start + MAX_CALL_HEAD_CHARS))
            if head is not None and (head.end() < len(text) or final):
                self._head, self._name = head, json.loads(f'"{head.group(1)}"')
                self._arguments = _JsonValueEnd(head.end())
        if self._head is not None and self._arguments is not None:
            arguments_start = self._head.end()
            args_end = self._arguments.advance(text)
            if args_end is None:
                return _CallView(self._name, arguments_start, len(text) if end is None else end, False), len(text)
            if self._close is None:
                close = text.find("}", max(args_end, self._close_from))
                self._close_from = len(text)
                self._close = close if close >= 0 else None
            after = self._close + 1 if self._close is not None else len(text)
            return _CallView(self._name, arguments_start, args_end, self._close is not None), after
        if end is None:
            return None, len(text)
        # Keys in another order, or extra whitespace: only the whole block can tell.
        try:
            obj = json.loads(text[self.start : end])
        except ValueError:
            return None, end
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            arguments = obj.get("arguments", obj.get("parameters", {}))
            return _CallView(obj["name"], 0, 0, True, json.dumps(arguments, ensure_ascii=False)), end
        return None, end


class _OutputParser:
    """(content, calls) of one choice's output as it grows: settled calls are kept, and
    each `feed` resumes where the last stopped, so per-token work does not grow with the
    output (it was quadratic: the whole text re-parsed for every chunk).

    `content_end`: the content is text[:content_end]. While streaming, content holds back
    what may still turn out to be the start of a tool call."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.settled: list[_CallView] = []  # calls that can no longer change
        self._search_from = 0  # where the search for the next "[" / "<tool_call>" / "," resumes
        self._first: int | None = None  # where the first "<tool_call>" (auto) or "[" (required) starts
        self._call: _CallParser | None = None  # the call being read
        self._block_end: int | None = None  # auto: where the current block's "</tool_call>" starts
        self._done = False  # required: the array is over

    def feed(self, new_text: str, final: bool) -> tuple[int, _CallView | None]:
        """(content_end, the call still being written); the calls so far are `settled`
        then that one, at most `max_calls` of them."""
        self.text += new_text
        if self.plan.mode == "named":
            return 0, _CallView(self.plan.name, 0, len(self.text), final)
        if self.plan.mode == "required":
            return 0, self._feed_required(final)
        return self._feed_auto(final)

    @property
    def max_calls(self) -> int | None:
        # parallel_tool_calls false: at most one call, as OpenAI promises (the rest dropped;
        # `required` has its grammar's maxItems instead).
        return 1 if self.plan.mode == "auto" and not self.plan.parallel else None

    def _feed_required(self, final: bool) -> _CallView | None:
        """The forced array: "[" then call objects separated by ","."""
        text = self.text
        while not self._done:
            if self._call is None:
                if self._first is None:
                    position = text.find("[", self._search_from)
                    if position < 0:
                        self._search_from = len(text)
                        return None
                    self._first = position
                else:  # after a call: a "," opens the next one, anything else ends the array
                    found = _NON_SPACE.search(text, self._search_from)
                    if found is None:
                        self._search_from = len(text)
                        return None
                    if found.group() != ",":
                        self._done = True
                        return None
                    position = found.start()
                self._call = _CallParser(position + 1)
            call, after = self._call.view(text, None, final)
            if call is None or not call.complete:
                return call
            self.settled.append(call)
            self._call, self._search_from = None, after
        return None

    def _find(self, needle: str) -> int:
        """The next `needle` from where the last search stopped (on a miss, the next search
        resumes just before the end, where the needle may be arriving)."""
        position = self.text.find(needle, self._search_from)
        if position < 0:
            self._search_from = max(self._search_from, len(self.text) - len(needle) + 1)
        return position

    def _feed_auto(self, final: bool) -> tuple[int, _CallView | None]:
        """Hermes blocks: the content is the text before the first "<tool_call>"."""
        text = self.text
        if self._first is None:
            first = self._find(CALL_OPEN)
            if first < 0:
                if final:
                    return len(text), None
                # Hold back a tail that may be the beginning of "<tool_call>".
                for keep in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
                    if CALL_OPEN.startswith(text[-keep:]):
                        return len(text) - keep, None
                return len(text), None
            self._first = first
            self._search_from = first
        pending = None
        while True:
            if self._call is None:
                next_open = self._find(CALL_OPEN)
                if next_open < 0:
                    break
                self._call = _CallParser(next_open + len(CALL_OPEN))
                self._search_from = self._call.start
            if self._block_end is None:
                block_end = self._find(CALL_CLOSE)
                self._block_end = block_end if block_end >= 0 else None
            end = self._block_end if self._block_end is not None else (len(text) if final else None)
            call, _ = self._call.view(text, end, final)
            if self._block_end is None:
                pending = call
                break
            if call is not None:
                self.settled.append(call)
            self._call, self._search_from, self._block_end = None, self._block_end, None
        if final and not self.settled and pending is None:
            return len(text), None  # the model wrote the tag but no call we can read: plain content
        return self._first, pending


def _view(plan: ToolPlan, text: str, final: bool) -> tuple[str, list[_CallView]]:
    """(content, calls) of a whole output: the streaming parser fed once, so streamed and
    whole outputs come from one function."""
    parser = _OutputParser(plan)
    content_end, pending = parser.feed(text, final)
    calls = parser.settled + ([pending] if pending is not None else [])
    return text[:content_end], calls[: parser.max_calls]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """The whole output as (content, tool calls). Calls whose arguments are not valid
    JSON (an `auto` output cut off by max_tokens) are dropped."""
    content, views = _view(plan, text, final=True)
    calls = []
    for view in views:
        if view.name is None:
            continue
        arguments = view.arguments(text)
        try:
            json.loads(arguments)
        except ValueError:
            continue
        calls.append(ToolCall(new_call_id(), FunctionCall(view.name, arguments)))
    if calls:
        return (content.strip() or None), calls
    return text, []


class ToolCallStream:
    """One streamed choice: turns the growing text into content and tool-call deltas.

    Work per update is proportional to the new text (plus the one call still being
    written): settled calls are skipped once their last fragment is out."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._parser = _OutputParser(plan)
        self._content_sent = 0
        self._names_sent: list[str] = []  # call ids, per call index
        self._arguments_sent: list[int] = []
        self._first_open_call = 0  # calls before this index are settled and fully sent

    @property
    def text(self) -> str:
        return self._parser.text

    def update(self, new_text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """(content delta, tool-call deltas) that `new_text` makes sendable."""
        parser = self._parser
        content_end, pending = parser.feed(new_text, final)
        text = parser.text
        content_delta = text[self._content_sent : content_end] if content_end > self._content_sent else ""
        self._content_sent = max(self._content_sent, content_end)
        deltas: list[ToolCallDelta] = []
        num_calls = len(parser.settled) + (pending is not None)
        if parser.max_calls is not None:
            num_calls = min(num_calls, parser.max_calls)
        for index in range(self._first_open_call, num_calls):
            view = parser.settled[index] if index < len(parser.settled) else pending
            assert view is not None
            if index < len(parser.settled) and index == self._first_open_call:
                self._first_open_call += 1  # settled: after this update, nothing more to send
            if view.name is None:
                continue
            if index == len(self._names_sent):
                call_id = new_call_id()
                self._names_sent.append(call_id)
                self._arguments_sent.append(0)
                deltas.append(ToolCallDelta(index, call_id, "function", FunctionCallDelta(name=view.name, arguments="")))
            if view.literal is not None:
                fragment = view.literal[self._arguments_sent[index] :]
            else:
                fragment = text[view.arguments_start + self._arguments_sent[index] : view.arguments_end]
            if fragment:
                self._arguments_sent[index] += len(fragment)
                deltas.append(ToolCallDelta(index, function=FunctionCallDelta(arguments=fragment)))
        return content_delta, deltas

    @property
    def called(self) -> bool:
        return bool(self._names_sent)
