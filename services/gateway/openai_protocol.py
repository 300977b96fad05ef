"""The OpenAI HTTP API as msgspec Structs: request bodies in, responses and chunks out.

Request bodies forbid unknown fields, so a parameter this server does not implement
(`logit_bias`, `tools`, `echo`, ...) is a 400 naming it rather than silently ignored
(OpenAI's "Unrecognized request argument supplied", code `unknown_parameter`).
Every number is bounded here, so nothing a client sends can overflow the MessagePack
wire format further in (an unbounded JSON integer would otherwise reach the encoder).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from pagedserve.shared.sampling_bounds import LOGIT_BIAS

Int32 = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]  # max_tokens, n, logprobs: range-checked later with a better message
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]  # checked against the vocabulary size later
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
FiniteFloat = Annotated[float, Meta(ge=-1e9, le=1e9)]  # also rejects inf and NaN
TimeoutSeconds = Annotated[float, Meta(gt=0, le=1e9)]  # checked against the server's ceiling later
LogitBias = Annotated[float, Meta(ge=LOGIT_BIAS.minimum, le=LOGIT_BIAS.maximum)]  # OpenAI's bounds, the table's
MAX_LOGIT_BIAS_ENTRIES = 1024  # each is a scatter entry in the step's sampler
# Lists a client could otherwise make as long as the body allows (1 MiB: ~100k entries),
# each costing work per token or per request somewhere further in.
MAX_STOP_TOKEN_IDS = 64  # beam search ranks (1 + this) x beam_width candidates per beam
MAX_STOP_STRING_CHARS = 256  # held-back text is matched against each stop string per piece
MAX_TOOLS = 128  # OpenAI's limit
MAX_MESSAGES = 2048
StopString = Annotated[str, Meta(max_length=MAX_STOP_STRING_CHARS)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    # Any JSON schema; whether the grammar library implements it is checked later, by
    # compiling it (a 400 naming `response_format.json_schema.schema` if not).
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None  # the output always matches the schema, strict or not


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, forbid_unknown_fields=True):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    json: dict[str, Any] | str | None = None  # a JSON schema (object or JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (xgrammar's GBNF dialect) with a `root` rule
    json_object: bool | None = None


class SamplingFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields both endpoints share; None means "the SamplingParams default"."""

    model: str | None = None
    max_tokens: Count | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: Int32 | None = None
    min_p: FiniteFloat | None = None
    seed: Seed | None = None
    n: Count = 1
    stop: StopString | list[StopString] | None = None  # how many: the server's --max-stop-strings
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Int32 = 0  # extension: lower is served first
    # vLLM's extension: requests share cached prefix blocks (and `cached_tokens` tells of
    # them) only with requests of the same salt; one per tenant keeps tenants apart.
    cache_salt: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    # Extension: seconds until the gateway aborts the request (at most, and by default,
    # the server's --request-timeout). Not the OpenAI SDK's client-side `timeout`, which
    # never reaches the body.
    timeout: TimeoutSeconds | None = None
    # Extension (vLLM's and HF's names): beam search over beam_width beams, returning the
    # best n; deterministic, so the sampling knobs above do not apply.
    beam_width: Count | None = None
    length_penalty: FiniteFloat | None = None
    early_stopping: bool | Literal["never"] | None = None
    # OpenAI's logit_bias: {"token id": bias in [-100, 100]}; ids outside the vocabulary are a 400.
    logit_bias: Annotated[dict[TokenId, LogitBias], Meta(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
    # vLLM's extension: EOS and stop_token_ids held back until min_tokens were generated
    # (at most max_tokens).
    min_tokens: Count | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs, and vLLM's
    # older guided_* names (still sent by clients written for vLLM < 0.10).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # A string, a list of token ids, or a batch of either (one choice block per prompt).
    prompt: str | list[str | TokenId | list[TokenId]]
    logprobs: Count | None = None
    # The prompt before the completion, in `text` and (with logprobs) in `logprobs`, its
    # first token's logprob null. With max_tokens 0 only the prompt comes back
    # (lm-evaluation-harness's loglikelihood requests).
    echo: bool = False
    # vLLM's extension: the logprob of every prompt token with its top-k alternatives,
    # in each choice's `prompt_logprobs`.
    prompt_logprobs: Count | None = None


class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    """Text only: this server runs text-only models (an image part is a 400)."""

    type: Literal["text"]
    text: str


class FunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's result: which call it answers
    # What the SDK's `message.model_dump()` of a returned assistant message also carries,
    # so it can go straight back into `messages`: accepted, not rendered. `audio` and the
    # legacy `function_call` only as null (this server returns neither).
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None


class FunctionDefinition(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern="^[a-zA-Z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(max_length=MAX_MESSAGES)]
    max_completion_tokens: Count | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: Count | None = None
    # vLLM's extension: the logprob of every token of the templated prompt with its top-k
    # alternatives, in the response's top-level `prompt_logprobs` (the first chunk's when
    # streaming).
    prompt_logprobs: Count | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: True, as OpenAI


# ---------------------------------------------------------------------------------------
# Responses. No omit_defaults on choices: OpenAI sends `"logprobs": null` and
# `"finish_reason": null` explicitly, and some clients index them without a default.
# ---------------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(msgspec.Struct):
    """vLLM's entry of `prompt_logprobs` (keyed by token id as a string)."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    # vLLM's: one entry per prompt token, the first null; null unless asked for.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class Completion(msgspec.Struct):
    id: str
    object: str  # "text_completion" (also for chunks, as OpenAI does)
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(msgspec.Struct, omit_defaults=True):
    """`usage` is left out, not null, on chunks that carry none."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None  # null when the turn is only tool calls, as OpenAI
    tool_calls: list[ToolCall] | None = None


class FunctionCallDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """A streamed tool call: the first chunk of call `index` brings its id, type and
    name; later ones append argument fragments."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(msgspec.Struct):
    id: str
    object: str  # "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # vLLM's: one entry per prompt token, the first null; null unless asked for.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str  # "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # on the first content chunk only


class ModelCard(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelCard]
