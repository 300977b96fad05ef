"""Tests for services/executor/sampler.py.

Every random check draws from seeded requests, so the tests are deterministic; the
thresholds still leave room for a correct sampler and none for the usual bugs (wrong
temperature, off-by-one nucleus, leaking masked tokens).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import pytest
import torch

from pagedserve.services.executor.sampler import (
    Sampler,
    SamplingTensors,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    mix_seed,
    token_counts,
)
from pagedserve.shared.sampling_params import SamplingParams

VOCAB_SIZE = 1000
# Every case runs on CPU; the CUDA ones are reported as skipped where no GPU is, never absent.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@dataclass
class FakeRequest:
    request_id: str
    sampling_params: SamplingParams
    prompt_token_ids: Sequence[int] = (1, 2, 3)
    output_token_ids: list[int] = field(default_factory=list)


def _requests(params: Sequence[SamplingParams]) -> list[FakeRequest]:
    return [FakeRequest(f"req-{i}", p) for i, p in enumerate(params)]


def _random_logits(num_rows: int, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def _logits_with_probs(
    probs: Sequence[float], vocab_size: int, seed: int
) -> tuple[torch.Tensor, list[int]]:
    """A [vocab_size] row whose softmax puts `probs` on a shuffled set of token ids (the
    rest share what is left, far below any of them); returns the row and, in order, the
    ids that carry probs[0], probs[1], ..."""
    rest = (1.0 - sum(probs)) / (vocab_size - len(probs))
    assert 0 < rest < min(probs) / 100
    row = torch.full((vocab_size,), math.log(rest), dtype=torch.float64)
    ids = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[: len(probs)]
    row[ids] = torch.tensor([math.log(p) for p in probs], dtype=torch.float64)
    return row.float(), ids.tolist()


def _sample_many(row: torch.Tensor, params: SamplingParams, num_draws: int) -> Counter[int]:
    """Token counts over `num_draws` copies of one row, each request seeded differently."""
    logits = row.unsqueeze(0).expand(num_draws, -1)
    requests = _requests([msgspec.structs.replace(params, seed=i) for i in range(num_draws)])
    return Counter(token.token_id for token in Sampler(row.shape[-1])(logits, requests))


# --- greedy -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    logits = _random_logits(16).to(device)
    tokens = Sampler(VOCAB_SIZE)(logits, _requests([SamplingParams(temperature=0.0)] * 16))
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()
    assert [t.sequence_id for t in tokens] == [f"req-{i}" for i in range(16)]


def test_greedy_ties_pick_the_lowest_index() -> None:
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, [7, 300, 999]] = 5.0
    tokens = Sampler(VOCAB_SIZE)(logits, _requests([SamplingParams(temperature=0.0)]))
    assert tokens[0].token_id == 7


def test_greedy_rows_in_a_mixed_batch_are_argmax_and_draw_no_randomness() -> None:
    logits = _random_logits(6)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=50)] * 3
    sampler = Sampler(VOCAB_SIZE)
    tokens = sampler(logits, _requests(params))
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i].token_id for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]

    # The unseeded stream must advance exactly as if the greedy rows were not there:
    # run the same 3 unseeded rows with and without greedy rows from the same state.
    generator = sampler._unseeded_generators[logits.device]
    state = generator.get_state()
    mixed = sampler(logits, _requests(params))
    generator.set_state(state)
    alone = sampler(logits[1::2], _requests(params[1::2]))
    assert [mixed[i].token_id for i in (1, 3, 5)] == [t.token_id for t in alone]


# --- seeds --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_is_independent_of_batch_and_order(device: str) -> None:
    """Generate 20 tokens for a seeded request alone, then inside a batch (in varying
    positions, next to requests using every other feature), then with a fresh Sampler
    as after a preemption: the tokens must be identical."""
    seeded = SamplingParams(temperature=0.9, seed=1234)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=5, top_p=0.8, min_p=0.1),
        SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, seed=99, logprobs=3),
    ]
    seeded_row = _random_logits(1, seed=1)[0].to(device) / 6  # flat: many plausible tokens
    other_rows = _random_logits(len(others), seed=2).to(device)

    def generate(sampler: Sampler, position: int) -> list[int]:
        request = FakeRequest("seeded", seeded)
        other_requests = _requests(others)
        for step in range(20):
            batch = list(other_requests)
            batch.insert(position % (len(batch) + 1), request)
            rows = list(other_rows.unbind(0))
            rows.insert(position % (len(rows) + 1), seeded_row)
            tokens = sampler(torch.stack(rows), batch)
            for req, token in zip(batch, tokens):
                req.output_token_ids.append(token.token_id)
            position += step  # move around the batch from step to step
        return list(request.output_token_ids)

    sampler = Sampler(VOCAB_SIZE)
    alone = []
    request = FakeRequest("seeded", seeded)
    for _ in range(20):
        token = sampler(seeded_row.unsqueeze(0), [request])[0].token_id
        request.output_token_ids.append(token)
        alone.append(token)

    assert len(set(alone)) > 10  # the draws do change from step to step
    assert generate(sampler, position=0) == alone
    assert generate(sampler, position=3) == alone
    assert generate(Sampler(VOCAB_SIZE), position=2) == alone


def test_different_seeds_give_different_tokens() -> None:
    row = _random_logits(1)[0] / 6
    counts = _sample_many(row, SamplingParams(), num_draws=200)
    assert len(counts) > 100  # 200 seeds over a flat distribution: mostly distinct tokens

    sampler = Sampler(VOCAB_SIZE)
    sequences = []
    for seed in (1, 2):
        request = FakeRequest("r", SamplingParams(seed=seed))
        for _ in range(30):
            request.output_token_ids.append(sampler(row.unsqueeze(0), [request])[0].token_id)
        sequences.append(request.output_token_ids)
    assert sum(a != b for a, b in zip(*sequences)) > 20


def test_mix_seed_separates_seeds_and_steps() -> None:
    mixed = {mix_seed(seed, step) for seed in range(-50, 50) for step in range(50)}
    assert len(mixed) == 100 * 50
    assert all(0 <= value < 2**64 for value in mixed)


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014), written here from the paper."""
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def test_mix_seed_is_splitmix64_of_the_seed_then_the_step_in_every_process() -> None:
    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output of SplitMix64 seeded 0
    cases = [(0, 0), (7, 3), (-1, 5), (2**63, 1), (123456789, 1000)]
    assert [mix_seed(seed, step) for seed, step in cases] == [_splitmix64(_splitmix64(seed % 2**64) ^ step) for seed, step in cases]
    # The same in another process with another hash seed: executors on other hosts draw alike.
    code = f"from pagedserve.services.executor.sampler import mix_seed; print([mix_seed(s, n) for s, n in {cases!r}])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == str([mix_seed(seed, step) for seed, step in cases])


# --- filters ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_never_samples_outside_the_k_largest(device: str) -> None:
    num_rows = 64
    logits = _random_logits(num_rows).to(device)
    top_k = 5
    allowed = logits.topk(top_k, dim=-1).indices.tolist()
    # High temperature: without the cut, most draws would land outside the top 5.
    params = [SamplingParams(temperature=5.0, top_k=top_k, seed=i) for i in range(num_rows // 2)]
    params += [SamplingParams(temperature=5.0, top_k=top_k)] * (num_rows // 2)  # unseeded
    sampler = Sampler(VOCAB_SIZE)
    for _ in range(5):
        tokens = sampler(logits, _requests(params))
        assert all(t.token_id in allowed[row] for row, t in enumerate(tokens))


def test_top_k_off_values_become_the_whole_vocabulary() -> None:
    params = [SamplingParams(top_k=k) for k in (0, -1, VOCAB_SIZE, 10 * VOCAB_SIZE, 5)]
    tensors = SamplingTensors.from_params(params, VOCAB_SIZE, torch.float32, torch.device("cpu"))
    assert tensors.top_k.tolist() == [VOCAB_SIZE] * 4 + [5]


def test_filters_that_are_off_leave_logits_bit_exact() -> None:
    """What a seeded request's batch invariance rests on: a row that turns a filter off
    comes out of it unchanged even when its batch-mates use it."""
    logits = _random_logits(3)
    # A dominant token: the float32 cumulative mass reaches 1.0 long before the tail,
    # which top_p == 1 must still keep.
    logits[2] = 0.0
    logits[2, 17] = 30.0
    top_k = torch.tensor([VOCAB_SIZE, 5, VOCAB_SIZE])
    masked = apply_top_k_top_p(logits, top_k, torch.tensor([1.0, 0.5, 1.0]))
    assert torch.equal(masked[0], logits[0])
    assert torch.isinf(masked[1]).sum() >= VOCAB_SIZE - 5
    assert torch.equal(masked[2], logits[2])


def test_top_p_samples_exactly_the_nucleus() -> None:
    probs = [0.4, 0.3, 0.2, 0.09]
    row, ids = _logits_with_probs(probs, VOCAB_SIZE, seed=3)
    # mass before each token: 0, 0.4, 0.7, 0.9 -> top_p=0.65 keeps the first two.
    counts = _sample_many(row, SamplingParams(top_p=0.65), num_draws=500)
    assert set(counts) == set(ids[:2])
    counts = _sample_many(row, SamplingParams(top_p=0.85), num_draws=500)
    assert set(counts) == set(ids[:3])
    # Within the nucleus the probabilities are renormalised: 0.4 / 0.7 and 0.3 / 0.7,
    # exactly (the filter's own output), and the draws follow them (fixed seeds).
    filtered = apply_top_k_top_p(row.unsqueeze(0), torch.tensor([row.shape[-1]]), torch.tensor([0.65])).softmax(-1)[0]
    torch.testing.assert_close(filtered[ids[:2]], torch.tensor([4 / 7, 3 / 7]), rtol=1e-5, atol=1e-6)
    assert float(filtered[ids[:2]].sum()) == pytest.approx(1.0, abs=1e-6)
    counts = _sample_many(row, SamplingParams(top_p=0.65), num_draws=2000)
    assert abs(counts[ids[0]] / 2000 - 4 / 7) < 0.05


def test_tiny_top_p_keeps_the_top_token() -> None:
    logits = _random_logits(8)
    params = [SamplingParams(top_p=1e-6, seed=i) for i in range(8)]
    tokens = Sampler(VOCAB_SIZE)(logits, _requests(params))
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()


def test_top_p_applies_after_top_k() -> None:
    probs = [0.3, 0.25, 0.2, 0.15]
    row, ids = _logits_with_probs(probs, VOCAB_SIZE, seed=4)
    # After top_k=2 the survivors renormalise to 0.545, 0.455: top_p=0.5 keeps one.
    counts = _sample_many(row, SamplingParams(top_k=2, top_p=0.5), num_draws=300)
    assert set(counts) == {ids[0]}


def test_min_p_samples_only_tokens_above_the_threshold() -> None:
    probs = [0.5, 0.2, 0.15, 0.1, 0.04]
    row, ids = _logits_with_probs(probs, VOCAB_SIZE, seed=5)
    # threshold = 0.25 * 0.5 = 0.125: keeps 0.5, 0.2, 0.15.
    counts = _sample_many(row, SamplingParams(min_p=0.25), num_draws=1000)
    assert set(counts) == set(ids[:3])


def test_apply_min_p_zeroes_below_ratio() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]], dtype=torch.float64)
    filtered = apply_min_p(probs, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert filtered.tolist() == [[0.5, 0.3, 0.0], [0.6, 0.25, 0.15]]


# --- temperature --------------------------------------------------------------------------


def _chi_square(counts: Counter[int], expected_probs: torch.Tensor, num_draws: int) -> float:
    expected = expected_probs.double() * num_draws
    observed = torch.tensor([counts[i] for i in range(len(expected))], dtype=torch.float64)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(temperature: float) -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2])
    num_draws = 20_000
    counts = _sample_many(row, SamplingParams(temperature=temperature), num_draws)
    # 5 degrees of freedom: P(chi2 > 25) ~ 1e-4 for a correct sampler; the seeds are
    # fixed, so this either always passes or always fails.
    assert _chi_square(counts, (row / temperature).softmax(-1), num_draws) < 25
    # And the same statistic sees the unscaled distribution as plainly wrong.
    assert _chi_square(counts, row.softmax(-1), num_draws) > 200


# --- penalties ----------------------------------------------------------------------------


def test_token_counts_counts_ragged_rows() -> None:
    counts = token_counts([[1, 1, 3], [], [0]], vocab_size=4, device=torch.device("cpu"))
    assert counts.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_apply_penalties_follows_the_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    prompt = token_counts([[0], [0]], 4, torch.device("cpu"))
    output = token_counts([[1, 1, 3], [1, 1, 3]], 4, torch.device("cpu"))
    penalized = apply_penalties(
        logits,
        prompt,
        output,
        presence_penalty=torch.tensor([0.25, 0.0]),
        frequency_penalty=torch.tensor([0.5, 0.0]),
        repetition_penalty=torch.tensor([2.0, 1.0]),
    )
    # token 0: prompt only      -> 2 / 2 = 1 (presence/frequency ignore the prompt)
    # token 1: output twice     -> -1 * 2 - 0.5 * 2 - 0.25 = -3.25
    # token 2: never seen       -> unchanged
    # token 3: output once      -> 3 / 2 - 0.5 - 0.25 = 0.75
    assert penalized[0].tolist() == [1.0, -3.25, 0.5, 0.75]
    assert torch.equal(penalized[1], logits[1])  # neutral penalties: bit-exact


def test_frequency_penalty_avoids_generated_tokens() -> None:
    # Nearly flat logits: a penalty of 2 per occurrence pushes any generated token
    # below every fresh one, so greedy decoding never repeats.
    row = _random_logits(1, seed=6) / 30
    request = FakeRequest("r", SamplingParams(temperature=0.0, frequency_penalty=2.0))
    sampler = Sampler(VOCAB_SIZE)
    for _ in range(40):
        request.output_token_ids.append(sampler(row, [request])[0].token_id)
    assert len(set(request.output_token_ids)) == 40

    plain = FakeRequest("r", SamplingParams(temperature=0.0), output_token_ids=[])
    for _ in range(5):
        plain.output_token_ids.append(sampler(row, [plain])[0].token_id)
    assert len(set(plain.output_token_ids)) == 1  # without it greedy repeats itself


def test_repetition_penalty_pushes_prompt_tokens_down() -> None:
    row = torch.zeros(1, VOCAB_SIZE)
    row[0, 10] = 2.0
    row[0, 20] = 1.5
    request = FakeRequest("r", SamplingParams(temperature=0.0, repetition_penalty=2.0), [10])
    assert Sampler(VOCAB_SIZE)(row, [request])[0].token_id == 20  # 2 / 2 = 1 < 1.5


# --- logprobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_of_the_raw_logits(device: str) -> None:
    logits = _random_logits(5).to(device)
    params = [
        SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.5, seed=1),
        SamplingParams(logprobs=0, seed=2),
        SamplingParams(),
        SamplingParams(logprobs=20, temperature=0.0, frequency_penalty=1.0),
        SamplingParams(logprobs=3, top_k=3, seed=3),
    ]
    requests = _requests(params)
    for request in requests:
        request.output_token_ids = [int(logits[0].argmax())]
    tokens = Sampler(VOCAB_SIZE)(logits, requests)
    raw_logprobs = logits.log_softmax(dim=-1).cpu()

    for row, (token, p) in enumerate(zip(tokens, params)):
        if p.logprobs is None:
            assert token.logprob is None and token.top_token_ids == [] == token.top_logprobs
            continue
        assert token.logprob == pytest.approx(raw_logprobs[row, token.token_id].item(), abs=1e-6)
        expected = raw_logprobs[row].topk(p.logprobs)
        assert token.top_token_ids == expected.indices.tolist()
        assert token.top_logprobs == pytest.approx(expected.values.tolist(), abs=1e-6)
        assert token.top_logprobs == sorted(token.top_logprobs, reverse=True)


# --- dtypes and edges ---------------------------------------------------------------------


def test_float64_logits() -> None:
    logits = _random_logits(4).double()
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, seed=1, logprobs=2),
        SamplingParams(frequency_penalty=0.5, repetition_penalty=1.2, logprobs=2),
        SamplingParams(temperature=1.2),
    ]
    tokens = Sampler(VOCAB_SIZE)(logits, _requests(params))
    raw_logprobs = logits.log_softmax(dim=-1)
    assert tokens[0].token_id == int(logits[0].argmax())
    assert tokens[1].token_id in logits[1].topk(10).indices.tolist()
    for row in range(3):
        assert tokens[row].logprob == raw_logprobs[row, tokens[row].token_id].item()
    assert all(0 <= t.token_id < VOCAB_SIZE for t in tokens)


def test_logits_are_not_modified() -> None:
    logits = _random_logits(3)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.5, top_k=5, top_p=0.5, min_p=0.2, seed=1),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0),
        SamplingParams(temperature=0.0),
    ]
    Sampler(VOCAB_SIZE)(logits, _requests(params))
    assert torch.equal(logits, before)


def test_shape_mismatch_is_an_error_with_numbers() -> None:
    with pytest.raises(ValueError, match=r"\(2, 1000\)"):
        Sampler(VOCAB_SIZE)(_random_logits(3), _requests([SamplingParams()] * 2))


def test_empty_batch() -> None:
    assert Sampler(VOCAB_SIZE)(torch.empty(0, VOCAB_SIZE), []) == []
