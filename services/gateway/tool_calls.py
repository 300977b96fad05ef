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
fragments equal the non-streamed `arguments` exactly: both come from one function,
`_view`, over the text so far.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pagedserve.services.gateway.errors import invalid_request
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
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise invalid_request(f"tools declare the function {duplicates[0]!r} more than once", "tools")
    for i, tool in enumerate(tools):
        parameters = tool.function.parameters
        if parameters is not None and parameters.get("type", "object") != "object":
            raise invalid_request("a function's parameters must be a JSON schema of type object", f"tools[{i}].function.parameters")
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
    # function's $defs to the array schema's root so they still resolve.
    definitions: dict[str, Any] = {}
    variants = []
    for tool in plan.tools:
        parameters = dict(_parameters(tool))
        definitions.update(parameters.pop("$defs", {}))
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


@dataclass
class _CallView:
    name: str | None
    arguments: str  # grows only, as the text grows
    complete: bool


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array starting at text[start], None while it
    is incomplete (or not an object or array)."""
    if start >= len(text) or text[start] not in "{[":
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _call_at(text: str, start: int, end: int | None) -> tuple[_CallView | None, int]:
    """The call object starting at text[start] (a block ending at `end` when known):
    its view, and the index past it (past the arguments while it is incomplete)."""
    head = _CALL_HEAD.match(text, start)
    if head is not None:
        name = json.loads(f'"{head.group(1)}"')
        args_end = _value_end(text, head.end())
        if args_end is None:
            return _CallView(name, text[head.end() : end], False), len(text)
        close = text.find("}", args_end)
        return _CallView(name, text[head.end() : args_end], close >= 0), (close + 1 if close >= 0 else len(text))
    if end is None:
        return None, len(text)
    # Keys in another order, or extra whitespace: only the whole block can tell.
    try:
        obj = json.loads(text[start:end])
    except ValueError:
        return None, end
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        arguments = obj.get("arguments", obj.get("parameters", {}))
        return _CallView(obj["name"], json.dumps(arguments, ensure_ascii=False), True), end
    return None, end


def _view(plan: ToolPlan, text: str, final: bool) -> tuple[str, list[_CallView]]:
    """(content, calls) of the output so far. While streaming, content holds back what
    may still turn out to be the start of a tool call."""
    if plan.mode == "named":
        return "", [_CallView(plan.name, text, final)]
    if plan.mode == "required":
        calls = []
        position = text.find("[")
        while position >= 0:
            call, after = _call_at(text, position + 1, None)
            if call is None:
                break
            calls.append(call)
            if not call.complete:
                break
            rest = text[after:].lstrip()
            position = len(text) - len(rest) if rest.startswith(",") else -1
        return "", calls
    # auto: Hermes blocks.
    first = text.find(CALL_OPEN)
    if first < 0:
        if final:
            return text, []
        # Hold back a tail that may be the beginning of "<tool_call>".
        for keep in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
            if CALL_OPEN.startswith(text[-keep:]):
                return text[:-keep], []
        return text, []
    calls = []
    position = first
    while position >= 0:
        block_start = position + len(CALL_OPEN)
        block_end = text.find(CALL_CLOSE, block_start)
        end = block_end if block_end >= 0 else (len(text) if final else None)
        call, _ = _call_at(text, block_start, end)
        if call is None:
            if end is None:
                break
        else:
            calls.append(call)
        if block_end < 0:
            break
        position = text.find(CALL_OPEN, block_end)
    if final and not calls:
        return text, []  # the model wrote the tag but no call we can read: plain content
    # parallel_tool_calls false: at most one call, as OpenAI promises (the rest dropped).
    return text[:first], calls if plan.parallel else calls[:1]


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
        try:
            json.loads(view.arguments)
        except ValueError:
            continue
        calls.append(ToolCall(new_call_id(), FunctionCall(view.name, view.arguments)))
    if calls:
        return (content.strip() or None), calls
    return text, []


@dataclass
class ToolCallStream:
    """One streamed choice: turns the growing text into content and tool-call deltas."""

    plan: ToolPlan
    text: str = ""
    _content_sent: int = 0
    _names_sent: list[str] = field(default_factory=list)  # call ids, per call index
    _arguments_sent: list[int] = field(default_factory=list)

    def update(self, new_text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """(content delta, tool-call deltas) that `new_text` makes sendable."""
        self.text += new_text
        content, views = _view(self.plan, self.text, final)
        content_delta = content[self._content_sent :]
        self._content_sent = max(self._content_sent, len(content))
        deltas: list[ToolCallDelta] = []
        for index, view in enumerate(views):
            if view.name is None:
                continue
            if index == len(self._names_sent):
                call_id = new_call_id()
                self._names_sent.append(call_id)
                self._arguments_sent.append(0)
                deltas.append(ToolCallDelta(index, call_id, "function", FunctionCallDelta(name=view.name, arguments="")))
            fragment = view.arguments[self._arguments_sent[index] :]
            if fragment:
                self._arguments_sent[index] = len(view.arguments)
                deltas.append(ToolCallDelta(index, function=FunctionCallDelta(arguments=fragment)))
        return content_delta, deltas

    @property
    def called(self) -> bool:
        return bool(self._names_sent)
