"""Forking (services/scheduler/forking.py): a fork starts where its parent is, in its
blocks; parallel samples are planned in the step that samples the first token and
remembered while any of them is alive."""

from __future__ import annotations

from pagedserve.services.scheduler.beam_group import BeamGroup
from pagedserve.services.scheduler.forking import ParallelSamples, fork_request
from pagedserve.services.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.shared.messages import ForkedRequest
from pagedserve.shared.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_parent(manager: KVCacheManager, prompt_len: int = 10, **params: object) -> Request:
    """A request that has computed its prompt (prefix caching on: its full blocks hashed)."""
    parent = Request(
        "a", list(range(prompt_len)), SamplingParams(max_tokens=8, seed=5, **params),  # type: ignore[arg-type]
        arrival_time=2.5, eos_token_id=0, priority=1,
    )
    manager.allocate_for_admission(parent, [], prompt_len)
    parent.num_computed_tokens = prompt_len
    manager.register_full_blocks(parent)
    parent.status = RequestStatus.RUNNING
    return parent


def make_manager() -> KVCacheManager:
    return KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=True, hash_extra_keys=())


def test_a_sample_fork_shares_the_blocks_and_the_prompt_hashes_only() -> None:
    manager = make_manager()
    parent = make_parent(manager, prompt_len=11)
    parent.output_token_ids.append(40)  # its first token fills block 2
    manager.hash_blocks(parent)
    assert len(parent.block_hashes) == 3
    sample = fork_request(parent, "a#1", parent.sampling_params.for_sample(1), 0, arrival_seq=9, kv_cache_manager=manager)
    assert (sample.request_id, sample.parent_request_id, sample.client_request_id) == ("a#1", "a", "a")
    assert (sample.arrival_time, sample.arrival_seq, sample.priority, sample.eos_token_id) == (2.5, 9, 1, 0)
    assert sample.sampling_params.seed == 6 and sample.status == RequestStatus.RUNNING
    assert sample.output_token_ids == [] and sample.num_computed_tokens == 11
    assert sample.block_ids == parent.block_ids
    assert all(manager.block_pool.ref_count(b) == 2 for b in parent.block_ids)
    assert sample.block_hashes == parent.block_hashes[:2]  # block 2 holds the parent's own token


def test_a_beam_fork_takes_the_parents_whole_output_and_hashes() -> None:
    manager = make_manager()
    parent = make_parent(manager, prompt_len=7)
    parent.output_token_ids += [40, 41]
    parent.num_computed_tokens = 8
    manager.register_full_blocks(parent)
    beam = fork_request(parent, "a#b1", parent.sampling_params, parent.num_output_tokens, 3, manager)
    assert beam.output_token_ids == [40, 41] and beam.output_token_ids is not parent.output_token_ids
    assert beam.block_hashes == parent.block_hashes and len(beam.block_hashes) == 2
    assert beam.num_registered_blocks == parent.num_registered_blocks == 2


def test_samples_are_forked_in_the_step_that_samples_the_first_token_only() -> None:
    manager = make_manager()
    parent = make_parent(manager, prompt_len=10, n=3)
    parent.num_computed_tokens = 4  # chunked prefill: 6 tokens left
    samples = ParallelSamples()
    assert ParallelSamples.num_to_fork(parent) == 2
    assert samples.forks_for_step([(parent, 5)]) == []  # the chunk stops short of the end
    assert samples.forks_for_step([(parent, 6)]) == [ForkedRequest("a#1", "a", 1), ForkedRequest("a#2", "a", 2)]
    parent.output_token_ids.append(40)
    assert ParallelSamples.num_to_fork(parent) == 0


def test_beams_and_samples_fork_no_samples() -> None:
    manager = make_manager()
    sample = make_parent(manager, n=3)
    sample.parent_request_id = "x"
    assert ParallelSamples.num_to_fork(sample) == 0
    beam = make_parent(manager, beam_width=2, n=2, temperature=0.0)
    BeamGroup.start(beam, max_model_len=64)
    assert ParallelSamples.num_to_fork(beam) == 0


def test_the_samples_are_remembered_until_none_is_alive() -> None:
    manager = make_manager()
    parent = make_parent(manager, n=3)
    samples = ParallelSamples()
    forks = [fork_request(parent, f"a#{i}", parent.sampling_params, 0, i, manager) for i in (1, 2)]
    for fork in forks:
        samples.add(fork)
    assert samples.with_samples("a") == ["a", "a#1", "a#2"]
    assert samples.with_samples("b") == ["b"]
    samples.forget_if_ended("a", {"a#2"})
    assert samples.with_samples("a") == ["a", "a#1", "a#2"]
    samples.forget_if_ended("a", set())
    assert samples.with_samples("a") == ["a"]
