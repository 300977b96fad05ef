"""The value bounds of the sampling parameters: one table that both enforces them
(`SamplingParams.validate`) and states them (the gateway's OpenAPI document,
services/gateway/openapi.py), so the two cannot disagree.

A bound is a closed or half-open range on one number. Rules across fields (n at most
beam_width, min_tokens at most max_tokens, what beam search excludes) stay in `validate`;
limits a deployment sets (the gateway's --max-n, its context length) are applied by the
gateway on top. Torch-free: the gateway reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BEAM_WIDTH = 64
DEFAULT_MAX_LOGPROBS = 20  # the gateway's --max-logprobs default; the Python API's bound


class InvalidSamplingParam(ValueError):
    """A sampling parameter out of its bounds or against a rule. `param` names the field,
    so that the gateway's 400 says which one without reading the message."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Bound:
    field: str  # the SamplingParams field
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # (minimum, ...] instead of [minimum, ...]
    note: str = ""  # what the values mean, in the error message and the schema's description
    # Request fields that carry the same value under another name (chat's top_logprobs).
    aliases: tuple[str, ...] = ()
    each_value: bool = False  # the field is a mapping; the bound is on each of its values

    def holds(self, value: float) -> bool:
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return False
        return self.maximum is None or value <= self.maximum

    def range_text(self) -> str:
        low, high = _number(self.minimum), _number(self.maximum)
        if self.minimum is not None and self.maximum is not None:
            return f"in {'(' if self.exclusive_minimum else '['}{low}, {high}]"
        if self.minimum is not None:
            return f"> {low}" if self.exclusive_minimum else f"at least {low}"
        return f"at most {high}"

    def error(self, value: float, label: str | None = None) -> InvalidSamplingParam:
        """The error for `value`; `label` names it in the message (a mapping's entry)."""
        note = f" ({self.note})" if self.note else ""
        return InvalidSamplingParam(self.field, f"{label or self.field} must be {self.range_text()}{note}, got {value}")

    def json_schema(self) -> dict[str, float]:
        """The bound as JSON Schema keywords."""
        keywords: dict[str, float] = {}
        if self.minimum is not None:
            keywords["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            keywords["maximum"] = self.maximum
        return keywords


def _number(value: float | None) -> str:
    return f"{value:g}" if value is not None else ""


def sampling_bounds(max_logprobs: int = DEFAULT_MAX_LOGPROBS) -> tuple[Bound, ...]:
    """The table; `max_logprobs` is the deployment's cap on (prompt) logprobs."""
    return (
        Bound("max_tokens", minimum=1, aliases=("max_completion_tokens",)),
        Bound("temperature", minimum=0, note="0: greedy"),
        Bound("top_p", minimum=0, exclusive_minimum=True, maximum=1),
        Bound("top_k", minimum=-1, note="-1 or 0: off"),
        Bound("min_p", minimum=0, maximum=1),
        Bound("presence_penalty", minimum=-2, maximum=2),
        Bound("frequency_penalty", minimum=-2, maximum=2),
        Bound("repetition_penalty", minimum=0, exclusive_minimum=True, note="1: off"),
        Bound("logprobs", minimum=0, maximum=max_logprobs, aliases=("top_logprobs",), note="alternatives per token"),
        Bound("prompt_logprobs", minimum=0, maximum=max_logprobs, note="alternatives per prompt token"),
        Bound("min_tokens", minimum=0),
        Bound("n", minimum=1),
        Bound("beam_width", minimum=1, maximum=MAX_BEAM_WIDTH, note="1: no beam search"),
        Bound("length_penalty", minimum=-10, maximum=10),
        LOGIT_BIAS,
    )


# OpenAI's bounds; also the request type's (services/gateway/openai_protocol.py), which
# refuses a bias out of them while decoding the body.
LOGIT_BIAS = Bound("logit_bias", minimum=-100, maximum=100, each_value=True, note="added to the token's logit; -100 bans it")
