"""SamplingParams.for_sample: the params of one sample of an n > 1 request."""

from __future__ import annotations

from pagedserve.shared.sampling_params import SamplingParams


def test_sample_i_is_one_sample_seeded_seed_plus_i() -> None:
    params = SamplingParams(n=4, seed=10, temperature=0.7, max_tokens=5)
    assert [params.for_sample(i).seed for i in range(4)] == [10, 11, 12, 13]
    assert all(params.for_sample(i).n == 1 for i in range(4))
    assert params.for_sample(2).temperature == 0.7 and params.for_sample(2).max_tokens == 5
    assert params.n == 4 and params.seed == 10  # a new struct: the original is unchanged


def test_unseeded_stays_unseeded_and_seeds_wrap_below_2_63() -> None:
    assert SamplingParams(n=3).for_sample(2).seed is None
    assert SamplingParams(n=3, seed=2**63 - 1).for_sample(2).seed == 1
