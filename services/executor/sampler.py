"""Batched sampling: one token per request from one step's logits.

Every row goes through the same pipeline, in vLLM's order:
    logit_bias and min_tokens -> penalties -> temperature -> top-k -> top-p -> min-p -> sample.
Each stage is a pure function over [num_rows, vocab_size] tensors on the logits' device,
driven by per-row parameter tensors, so a mixed batch costs the same few kernels as a
uniform one. A stage that no request of the batch uses is skipped; that choice is made
from the Python-side params, so it never waits on the device.

A row whose parameters switch a stage off comes out of that stage bit-for-bit unchanged
(x / 1.0, x - 0.0 and a sort-then-scatter are exact), which is what makes a seeded
request's tokens independent of the other requests in its batch.

Randomness: tokens are drawn with the exponential race, argmax(probs / E) with E ~ Exp(1)
i.i.d., which picks token i with probability probs[i] and needs no normalisation. A request
with a seed draws E from a generator re-seeded with `mix_seed(seed, num_output_tokens)`
at every step: its n-th token depends only on (seed, n, its logits), so it is the same
after a preemption and recompute, in another process, in any batch. Requests without a
seed share one generator the sampler owns. Greedy rows draw nothing.

Logprobs are those of the raw logits (before penalties and temperature), as vLLM reports
them by default: they describe the model, not the sampling settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pagedserve.shared.messages import SampledToken
from pagedserve.shared.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


class SamplingRequest(Protocol):
    """What the sampler reads of a request; the executor's mirror of a request has it."""

    request_id: str
    sampling_params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated before this step's token


class TokenMask(Protocol):
    """Which tokens some rows may sample (structured output's per-step grammar bitmask,
    `structured_output.py`); kept abstract so the sampler needs no grammar library."""

    def apply_(self, logits: torch.Tensor) -> None:
        """Set the forbidden tokens of the masked rows to -inf, in place."""
        ...


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters as [num_rows] tensors on the logits' device."""

    temperature: torch.Tensor  # 0.0 marks a greedy row
    top_k: torch.Tensor  # int64; rows with top-k off hold vocab_size (keeps everything)
    top_p: torch.Tensor
    min_p: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    repetition_penalty: torch.Tensor

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        vocab_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> SamplingTensors:
        # One host -> device copy for all seven columns, not seven. float64 holds every
        # top_k exactly; the float columns are then cast to the logits' dtype.
        rows = [
            (
                p.temperature,
                float(p.top_k if 0 < p.top_k < vocab_size else vocab_size),
                p.top_p,
                p.min_p,
                p.presence_penalty,
                p.frequency_penalty,
                p.repetition_penalty,
            )
            for p in params
        ]
        table = torch.tensor(rows, dtype=torch.float64, device=device)
        columns = table.to(dtype).unbind(1)
        return cls(
            temperature=columns[0],
            top_k=table[:, 1].long(),
            top_p=columns[2],
            min_p=columns[3],
            presence_penalty=columns[4],
            frequency_penalty=columns[5],
            repetition_penalty=columns[6],
        )


def mix_seed(seed: int, num_output_tokens: int) -> int:
    """A 64-bit generator seed for draw number `num_output_tokens` of a request seeded
    with `seed`.

    SplitMix64 finalisers scramble both inputs, so neighbouring seeds or steps give
    unrelated streams (seeding a generator with seed + step would make seed s at step 1
    replay seed s + 1 at step 0)."""

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    return splitmix64(splitmix64(seed & _MASK64) ^ num_output_tokens)


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """int32 [num_rows, vocab_size]: how often each token id occurs in each row's list.

    The ragged lists are padded with the out-of-vocabulary id `vocab_size`, whose counts
    land in an extra column that is sliced off, so one scatter_add serves the batch."""
    max_len = max((len(ids) for ids in token_ids), default=0)
    padded = torch.tensor(
        [list(ids) + [vocab_size] * (max_len - len(ids)) for ids in token_ids],
        dtype=torch.int64,
        device=device,
    ).view(len(token_ids), max_len)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_counts: torch.Tensor,
    output_counts: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    repetition_penalty: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of logits [num_rows, vocab]; counts are [num_rows, vocab], the
    penalties [num_rows].

    Repetition (HF): each token seen in the prompt or the output is made less likely, its
    logit divided by the penalty when positive and multiplied when negative (dividing a
    negative logit would raise it). Presence and frequency (OpenAI): logit -=
    frequency * count + presence * (count > 0), over output tokens only: they stop the
    model repeating itself, not quoting its prompt."""
    output_mask = output_counts > 0
    seen = (prompt_counts > 0) | output_mask
    repetition = repetition_penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    return (
        logits
        - frequency_penalty.unsqueeze(1) * output_counts.to(logits.dtype)
        - presence_penalty.unsqueeze(1) * output_mask.to(logits.dtype)
    )


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / T per row. Greedy rows (T == 0) are divided by 1: their token is the
    argmax taken before this stage, and dividing by 0 would fill them with inf/nan."""
    safe_temperature = torch.where(temperature == 0, 1.0, temperature)
    return logits / safe_temperature.unsqueeze(1)


def _mask_top_k_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the top_k[row] largest of descending-sorted logits. Like HF, the cut is by
    value: ties with the k-th largest stay, since nothing tells them apart."""
    kth_largest = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
    return sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))


def _mask_top_p_sorted(sorted_logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the nucleus of descending-sorted logits: the shortest prefix whose probability
    reaches top_p[row], i.e. the tokens whose preceding mass is still below top_p."""
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    outside = mass_before >= top_p.unsqueeze(1)
    # top_p == 1 keeps everything: without this, a cumsum that rounds to 1.0 before the
    # end would drop the tail. The top token always stays, whatever the rounding.
    outside &= (top_p < 1).unsqueeze(1)
    outside[:, 0] = False
    return sorted_logits.masked_fill(outside, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p (nucleus over the top-k survivors, renormalised), sharing one
    sort of the batch; masked tokens become -inf."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    sorted_logits = _mask_top_k_sorted(sorted_logits, top_k)
    sorted_logits = _mask_top_p_sorted(sorted_logits, top_p)
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens whose probability is below min_p[row] times the row's largest;
    the largest always survives. Works on unnormalised probs too (the test is a ratio)."""
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """int64 [num_rows]: argmax(probs / noise), a draw from probs when noise ~ Exp(1).

    The noise must be > 0; zero-probability tokens then can never win."""
    return (probs / noise).argmax(dim=-1)


class Sampler:
    """Turns a step's logits into one SampledToken per request. Holds no per-request
    state: a seeded request's randomness is derived afresh each step (see module doc)."""

    def __init__(self, vocab_size: int, eos_token_id: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id  # what min_tokens holds back, with stop_token_ids
        # One per device, made on first use. The unseeded ones start from OS entropy so
        # two servers do not produce the same "random" text; the seeded ones are scratch
        # generators re-seeded before every draw, kept only to avoid re-creating them.
        self._unseeded_generators: dict[torch.device, torch.Generator] = {}
        self._seeded_generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[SamplingRequest], token_mask: TokenMask | None = None
    ) -> list[SampledToken]:
        """logits: [len(requests), vocab_size], row i belonging to requests[i].
        `token_mask`: structured output's allowed tokens for the constrained rows (None
        when the batch has none). Without a mask the logits are not modified; with one,
        the masked rows' forbidden tokens are set to -inf in place (the runner's logits
        are its own scratch, and a copy of the batch's logits per step was measurable)."""
        if logits.dim() != 2 or logits.shape != (len(requests), self.vocab_size):
            raise ValueError(
                f"logits have shape {tuple(logits.shape)} but {len(requests):,} requests "
                f"over a vocabulary of {self.vocab_size:,} need "
                f"({len(requests)}, {self.vocab_size})"
            )
        if not requests:
            return []
        if logits.dtype not in (torch.float32, torch.float64):
            # softmax, cumsum and log_softmax in half precision lose too much.
            logits = logits.float()
        # Logprobs are those of the raw logits (module doc): taken before the mask.
        wants_logprobs = any(request.sampling_params.logprobs is not None for request in requests)
        raw_logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None
        if token_mask is not None:
            # Before every other stage, so no bias or filter can revive a token the
            # grammar forbids.
            token_mask.apply_(logits)
        token_ids = self._sample(logits, requests)
        return _sampled_tokens(raw_logprobs, token_ids, requests)

    def _sample(
        self, logits: torch.Tensor, requests: Sequence[SamplingRequest]
    ) -> torch.Tensor:
        """int64 [num_rows] token ids, on the logits' device."""
        params = [request.sampling_params for request in requests]
        if any(p.logit_bias or p.min_tokens for p in params):
            logits = apply_logit_bias_and_min_tokens(logits, requests, self.eos_token_id)
        greedy = [p.greedy for p in params]
        penalized = any(_has_penalties(p) for p in params)
        if all(greedy) and not penalized:
            return logits.argmax(dim=-1)
        tensors = SamplingTensors.from_params(params, self.vocab_size, logits.dtype, logits.device)
        if penalized:
            prompts = [request.prompt_token_ids for request in requests]
            outputs = [request.output_token_ids for request in requests]
            logits = apply_penalties(
                logits,
                token_counts(prompts, self.vocab_size, logits.device),
                token_counts(outputs, self.vocab_size, logits.device),
                tensors.presence_penalty,
                tensors.frequency_penalty,
                tensors.repetition_penalty,
            )
        # Greedy is the argmax of the penalised logits (what HF's greedy search does):
        # temperature and the top-k/p, min-p filters never change an argmax.
        greedy_token_ids = logits.argmax(dim=-1) if any(greedy) else None
        if greedy_token_ids is not None and all(greedy):
            return greedy_token_ids
        random_params = [p for p in params if not p.greedy]
        logits = apply_temperature(logits, tensors.temperature)
        if any(0 < p.top_k < self.vocab_size or p.top_p < 1.0 for p in random_params):
            logits = apply_top_k_top_p(logits, tensors.top_k, tensors.top_p)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in random_params):
            probs = apply_min_p(probs, tensors.min_p)
        random_token_ids = exponential_race(probs, self._exponential_noise(probs, requests))
        if greedy_token_ids is None:
            return random_token_ids
        return torch.where(tensors.temperature == 0, greedy_token_ids, random_token_ids)

    def _exponential_noise(
        self, probs: torch.Tensor, requests: Sequence[SamplingRequest]
    ) -> torch.Tensor:
        """Exp(1) noise shaped like probs, each row from its request's randomness. Greedy
        rows hold 1.0 and consume nothing, so they never shift the unseeded stream."""
        noise = torch.empty_like(probs)
        greedy_rows: list[int] = []
        unseeded_rows: list[int] = []
        for row, request in enumerate(requests):
            params = request.sampling_params
            if params.greedy:
                greedy_rows.append(row)
            elif params.seed is None:
                unseeded_rows.append(row)
            else:
                # The one unavoidable per-row loop: each seeded row has its own stream.
                generator = self._generator(self._seeded_generators, probs.device)
                generator.manual_seed(mix_seed(params.seed, len(request.output_token_ids)))
                noise[row].exponential_(generator=generator)
        if greedy_rows:
            noise[greedy_rows] = 1.0
        if unseeded_rows:
            generator = self._generator(self._unseeded_generators, probs.device)
            if len(unseeded_rows) == len(requests):
                noise.exponential_(generator=generator)
            else:
                noise[unseeded_rows] = torch.empty(
                    len(unseeded_rows), probs.shape[1], dtype=probs.dtype, device=probs.device
                ).exponential_(generator=generator)
        # exponential_ may return exactly 0, which would turn a masked token's 0 / 0 into
        # nan and a kept one's p / 0 into inf; the smallest normal is as good as 0 here.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    @staticmethod
    def _generator(
        generators: dict[torch.device, torch.Generator], device: torch.device
    ) -> torch.Generator:
        generator = generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.seed()
            generators[device] = generator
        return generator


def apply_logit_bias_and_min_tokens(
    logits: torch.Tensor, requests: Sequence[SamplingRequest], eos_token_id: int | None
) -> torch.Tensor:
    """A copy of logits [num_rows, vocab] with each row's logit_bias added and, while a
    row has generated fewer than min_tokens, its EOS (unless ignore_eos) and stop token
    ids at -inf (HF's MinNewTokensLengthLogitsProcessor). One scatter for the batch; the
    ids are bounded by the gateway, so every (row, token) entry indexes the vocabulary.
    Applied before penalties and temperature, as vLLM's logits processors are."""
    rows: list[int] = []
    columns: list[int] = []
    values: list[float] = []
    for row, request in enumerate(requests):
        params = request.sampling_params
        for token_id, bias in params.logit_bias.items():
            rows.append(row)
            columns.append(token_id)
            values.append(bias)
        if len(request.output_token_ids) < params.min_tokens:
            held_back = set(params.stop_token_ids)
            if eos_token_id is not None and not params.ignore_eos:
                held_back.add(eos_token_id)
            rows += [row] * len(held_back)
            columns += held_back
            values += [float("-inf")] * len(held_back)
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(columns, device=device))
    # accumulate: a biased stop id held back adds bias + -inf = -inf, never nan.
    return logits.index_put(index, torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.repetition_penalty != 1.0
    )


def _sampled_tokens(
    logprobs: torch.Tensor | None, token_ids: torch.Tensor, requests: Sequence[SamplingRequest]
) -> list[SampledToken]:
    """The messages for a step, with logprobs (the raw logits' log-softmax, None when no
    request asks for them) where asked for. Every device -> host transfer happens here,
    once per tensor."""
    num_logprobs = [request.sampling_params.logprobs for request in requests]
    token_id_list: list[int] = token_ids.tolist()
    if logprobs is None:
        return [
            SampledToken(sequence_id=request.request_id, token_id=token_id)
            for request, token_id in zip(requests, token_id_list)
        ]
    sampled_logprobs: list[float] = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    max_top = max(n or 0 for n in num_logprobs)
    top_logprobs: list[list[float]] = [[] for _ in requests]
    top_token_ids: list[list[int]] = [[] for _ in requests]
    if max_top > 0:
        values, ids = logprobs.topk(max_top, dim=-1)  # sorted, largest first
        top_logprobs, top_token_ids = values.tolist(), ids.tolist()
    messages = []
    for row, (request, n) in enumerate(zip(requests, num_logprobs)):
        if n is None:
            messages.append(SampledToken(request.request_id, token_id_list[row]))
            continue
        messages.append(
            SampledToken(
                sequence_id=request.request_id,
                token_id=token_id_list[row],
                logprob=sampled_logprobs[row],
                top_token_ids=top_token_ids[row][:n],
                top_logprobs=top_logprobs[row][:n],
            )
        )
    return messages


def beam_candidates(
    logits: torch.Tensor, beams: Sequence[SamplingRequest], eos_token_id: int | None
) -> list[SampledToken]:
    """What a beam reports instead of a sampled token: its `num_beam_candidates` best next
    tokens with their logprobs, computed as HF's beam search does (log_softmax over the
    logits in float32, whatever the model's dtype), best first. `token_id` is the best."""
    logprobs = logits.float().log_softmax(dim=-1)
    counts = [beam.sampling_params.num_beam_candidates(eos_token_id) for beam in beams]
    values, ids = logprobs.topk(min(max(counts), logprobs.shape[1]), dim=-1)
    value_rows: list[list[float]] = values.tolist()
    id_rows: list[list[int]] = ids.tolist()
    return [
        SampledToken(beam.request_id, id_row[0], value_row[0], id_row[:count], value_row[:count])
        for beam, count, id_row, value_row in zip(beams, counts, id_rows, value_rows)
    ]
