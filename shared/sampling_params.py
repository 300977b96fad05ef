"""Sampling parameters of one request.

A msgspec Struct because the same object travels gateway -> scheduler -> executor; it is
validated once where it enters (the gateway or the Python API) by `validate()`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from pagedserve.shared.structured_output import GrammarSpec

MAX_BEAM_WIDTH = 64


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

    def validate(self, max_logprobs: int = 20) -> None:
        """Raise ValueError naming the offending field; the gateway turns it into a 400."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise ValueError(f"logprobs must be in [0, {max_logprobs}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= max_logprobs:
            raise ValueError(f"prompt_logprobs must be in [0, {max_logprobs}], got {self.prompt_logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens ({self.max_tokens})], got {self.min_tokens}")
        for token_id, bias in self.logit_bias.items():
            if token_id < 0:
                raise ValueError(f"logit_bias has token id {token_id}; token ids are >= 0")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias must map to values in [-100, 100], got {bias} for token {token_id}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if not -10.0 <= self.length_penalty <= 10.0:
            raise ValueError(f"length_penalty must be in [-10, 10], got {self.length_penalty}")
        if self.use_beam_search:
            if self.n > self.beam_width:
                raise ValueError(f"n must be at most beam_width ({self.beam_width}) with beam search, got {self.n}")
            if self.logprobs is not None:
                raise ValueError("logprobs are not available with beam search (beam_width > 1)")
            if self.prompt_logprobs is not None:
                raise ValueError("prompt_logprobs are not available with beam search (beam_width > 1)")
            if self.logit_bias or self.min_tokens:
                name = "logit_bias" if self.logit_bias else "min_tokens"
                raise ValueError(f"{name} is not supported with beam search (beam_width > 1)")
            for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
                if getattr(self, name) != neutral:
                    raise ValueError(f"{name} is not supported with beam search (beam_width > 1)")
            if self.structured_output is not None:
                # A beam's candidates are its top tokens across the whole vocabulary; masking
                # them per beam would need a matcher per candidate. vLLM refuses it too.
                raise ValueError("structured_output (response_format, structured_outputs, forced tool calls) is not supported with beam search (beam_width > 1)")
        if self.structured_output is not None and self.ignore_eos:
            # A finished grammar allows only EOS; ignoring it would leave nothing to sample.
            raise ValueError("ignore_eos cannot be combined with structured output: a completed grammar allows only EOS")
