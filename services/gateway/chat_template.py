"""Which chat template renders a conversation with tools, and the fallback one.

A model's own template is used whenever it can render tools: transformers passes `tools`
to it, and a template that knows tool syntax renders them in the format the model was
trained on. Many small models' templates (the embedded SmolLM2's among them) ignore
`tools` and concatenate `content` as a string, so they drop the tool list and raise on
an assistant turn that is only `tool_calls` (content null, as the OpenAI SDK sends it
back). For those the gateway renders with a fallback: the Hermes convention (NousResearch
Hermes 2 Pro, Qwen2.5): tools as JSON in `<tools></tools>` in the system turn, calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results as `<tool_response>`.
`tool_calls.py` parses the same syntax back out of the model's output.

`--tool-chat-template` chooses: `auto` (the model's template if it renders tools, else
Hermes), `hermes` (always for requests with tools), `model` (never the fallback).
Requests without tools and without tool turns always use the model's own template.
"""

from __future__ import annotations

from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

ToolTemplateChoice = Literal["auto", "hermes", "model"]

HERMES_TOOL_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set ns.system = messages[0]['content'] -%}
{%- set messages = messages[1:] -%}
{%- else -%}
{%- set ns.system = default_system -%}
{%- endif -%}
<|im_start|>system
{{ ns.system }}
{%- if tools %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{%- endif %}<|im_end|>
{% for message in messages -%}
{%- if message['role'] == 'assistant' -%}
<|im_start|>assistant
{{ message['content'] or '' }}
{%- for call in message.get('tool_calls') or [] %}
{%- if (message['content'] or '') or not loop.first %}
{% endif -%}
<tool_call>
{"name": {{ call['function']['name'] | tojson }}, "arguments": {{ call['function']['arguments'] }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message['role'] == 'tool' -%}
{%- if loop.first or loop.previtem['role'] != 'tool' %}<|im_start|>user{% endif %}
<tool_response>
{{ message['content'] }}
</tool_response>
{%- if loop.last or loop.nextitem['role'] != 'tool' %}<|im_end|>
{% endif -%}
{%- else -%}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""

# The embedded SmolLM2's own default system prompt, kept when the fallback renders.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_rendering", "parameters": {"type": "object"}}}


NO_CHAT_TEMPLATE = (
    "the model has no chat template: start pagedserve with --chat-template FILE (a Jinja chat template, as "
    "vLLM's flag takes), or send a raw prompt to /v1/completions"
)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the model (or --chat-template) gave a template: without one a chat request
    is refused up front with NO_CHAT_TEMPLATE rather than transformers' own error."""
    return bool(getattr(tokenizer, "chat_template", None))


def model_template_renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the model's own template puts a tool list into the prompt (it renders
    differently with a tool than without), and accepts a tool-call-only assistant turn."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    try:
        without = tokenizer.apply_chat_template(messages, tokenize=False)
        with_tools = tokenizer.apply_chat_template(messages, tools=[_PROBE_TOOL], tokenize=False)
        call = {"id": "call_0", "type": "function", "function": {"name": "probe_tool_rendering", "arguments": "{}"}}
        tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": None, "tool_calls": [call]}], tools=[_PROBE_TOOL], tokenize=False
        )
    except Exception:  # jinja errors: the template cannot take tool turns
        return False
    return with_tools != without and "probe_tool_rendering" in str(with_tools)


def tool_template(tokenizer: PreTrainedTokenizerBase, choice: ToolTemplateChoice) -> str | None:
    """The template for requests with tools: None means the model's own."""
    if choice == "model" or (choice == "auto" and model_template_renders_tools(tokenizer)):
        return None
    return HERMES_TOOL_TEMPLATE


def encode_chat_with_tools(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str | None
) -> list[int]:
    """A conversation with tools or tool turns through `template` (None: the model's
    own), with the assistant turn opened."""
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools or None, chat_template=template, add_generation_prompt=True, tokenize=True,
        default_system=DEFAULT_SYSTEM_PROMPT,
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)
