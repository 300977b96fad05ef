"""Sampling parameters of one request.

A msgspec Struct because the same object travels gateway -> scheduler -> executor; it is
validated once where it enters (the gateway or the Python API) by `validate()`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from pagedserve.shared.sampling_bounds import DEFAULT_MAX_LOGPROBS, InvalidSamplingParam, sampling_bounds
from pagedserve.shared.structured_output import GrammarSpec


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # None: no logprobs; 0: logprob of the sampled token only; k: plus the top-k alternatives.
    logprobs: int | None = None
    n: int = 1
    # Beam search (an extension, as in vLLM and HF): beam_width > 1 keeps that many
    # candidate sequences and returns the best n of them, scored by cumulative logprob /
    # (generated length ** length_penalty), with HF transformers' `early_stopping` rules
    # (False: stop when no running beam can beat the finished ones at its current length;
    # True: stop once beam_width are finished; "never": only when none can ever beat them).
    # Deterministic: temperature, top-k/p, min-p and seed do not apply.
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    # OpenAI's logit_bias: added to the raw logits of these token ids before anything else
    # (penalties, temperature, filters), each in [-100, 100]; -100 bans a token, +100
    # all but forces it.
    logit_bias: dict[int, float] = {}
    # vLLM's min_tokens: EOS (unless ignore_eos) and stop_token_ids are masked out until
    # this many tokens were generated, as HF's MinNewTokensLengthLogitsProcessor does.
    min_tokens: int = 0
    # vLLM's prompt_logprobs: None: none; 0: the logprob of each prompt token (the first
    # has none: nothing precedes it); k: plus the top-k alternatives at each position.
    # Requests asking for them are computed whole, never from prefix-cache hits.
    prompt_logprobs: int | None = None
    # Structured output: the grammar every sampled token must keep the output inside
    # (response_format, vLLM's structured_outputs, forced tool calls); None: free text.
    structured_output: GrammarSpec | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    def num_beam_candidates(self, eos_token_id: int | None) -> int:
        """How many continuations each beam offers per step: HF's (1 + stop ids) x width,
        at least 2 x width, so that width of them survive even if every beam's best is a
        stop token."""
        return max(2, 1 + len(self.beam_stop_token_ids(eos_token_id))) * self.beam_width

    def beam_stop_token_ids(self, eos_token_id: int | None) -> frozenset[int]:
        stop = set(self.stop_token_ids)
        if eos_token_id is not None and not self.ignore_eos:
            stop.add(eos_token_id)
        return frozenset(stop)

    def for_sample(self, sample_index: int) -> SamplingParams:
        """The params of sample `sample_index` of an `n > 1` request, drawn as one
        sample (n=1): a seeded request's sample i uses seed `seed + i` (mod 2**63), so
        its tokens equal a separate request made with that seed, however it is run
        (forked from a shared prompt in the scheduler, or split by the gateway)."""
        seed = None if self.seed is None else (self.seed + sample_index) % 2**63
        return msgspec.structs.replace(self, seed=seed, n=1)

    def validate(self, max_logprobs: int = DEFAULT_MAX_LOGPROBS) -> None:
        """Raise InvalidSamplingParam (a ValueError) naming the offending field in its
        `param`; the gateway turns it into a 400. The value bounds are the table's
        (shared/sampling_bounds.py); the rules across fields are here."""
        for bound in sampling_bounds(max_logprobs):
            value = getattr(self, bound.field)
            if bound.each_value:
                for key, item in value.items():
                    if not bound.holds(item):
                        raise bound.error(item, f"{bound.field}[{key}]")
            elif value is not None and not bound.holds(value):
                raise bound.error(value)
        if self.min_tokens > self.max_tokens:
            raise InvalidSamplingParam(
                "min_tokens", f"min_tokens must be in [0, max_tokens ({self.max_tokens})], got {self.min_tokens}"
            )
        for token_id in self.logit_bias:
            if token_id < 0:
                raise InvalidSamplingParam("logit_bias", f"logit_bias has token id {token_id}; token ids are >= 0")
        if self.use_beam_search:
            self._validate_beam_search()
        if self.structured_output is not None and self.ignore_eos:
            # A finished grammar allows only EOS; ignoring it would leave nothing to sample.
            raise InvalidSamplingParam(
                "ignore_eos", "ignore_eos cannot be combined with structured output: a completed grammar allows only EOS"
            )

    def _validate_beam_search(self) -> None:
        if self.n > self.beam_width:
            raise InvalidSamplingParam("n", f"n must be at most beam_width ({self.beam_width}) with beam search, got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                raise InvalidSamplingParam(name, f"{name} are not available with beam search (beam_width > 1)")
        for name, neutral in (
            ("logit_bias", {}), ("min_tokens", 0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
        ):
            if getattr(self, name) != neutral:
                raise InvalidSamplingParam(name, f"{name} is not supported with beam search (beam_width > 1)")
        if self.structured_output is not None:
            # A beam's candidates are its top tokens across the whole vocabulary; masking
            # them per beam would need a matcher per candidate. vLLM refuses it too.
            raise InvalidSamplingParam(
                "structured_output",
                "structured_output (response_format, structured_outputs, forced tool calls) is not supported with beam search (beam_width > 1)",
            )
