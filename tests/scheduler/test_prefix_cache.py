"""Automatic prefix caching: block hashes (services/scheduler/prefix_cache.py) and how the
scheduler reuses cached blocks, driven by the fake executor of test_scheduler.py (whose
fake KV cache fails any hit on a block that does not hold the request's tokens)."""

from __future__ import annotations

import hashlib
import random

import pytest

from pagedserve.services.scheduler.prefix_cache import (
    PrefixCacheEvent,
    extend_block_hashes,
    hash_block_tokens,
)
from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.services.scheduler.status import block_pool_status
from pagedserve.shared.messages import NewRequestData, PrefixCacheStats
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.scheduler.test_scheduler import (
    EOS,
    FakeExecutor,
    Run,
    assert_all_free,
    reference_output,
    run_to_completion,
    step_once,
)

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4, arrival_time: float = 0.0) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(request_id, prompt, params, arrival_time=arrival_time, eos_token_id=EOS)


def make_scheduler(
    num_blocks: int = 64,
    enable_prefix_caching: bool = True,
    max_model_len: int = 4096,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
) -> Scheduler:
    config = SchedulerConfig(
        limits=SchedulingLimits(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
        ),
        model="test-model",
    )
    return Scheduler(config, num_blocks, BLOCK_SIZE, record_prefix_cache_events=True)


def tokens(start: int, count: int) -> list[int]:
    """`count` ordinary token ids (the fake model never samples below 10)."""
    return list(range(100 + start, 100 + start + count))


def first_admission(run: Run, request_id: str) -> tuple[NewRequestData, int]:
    """(NewRequestData, tokens scheduled) of the request's first admission in the run."""
    for step in run.steps:
        for new, count in zip(step.new_requests, step.num_scheduled_tokens):
            if new.request_id == request_id:
                return new, count
    raise AssertionError(f"{request_id} was never admitted")


def run_alone(sched: Scheduler, req: Request, executor: FakeExecutor, run: Run) -> None:
    sched.add_request(req)
    run_to_completion(sched, executor, run)
    assert run.outputs[req.request_id] == reference_output(req, sched.config.max_model_len)[0]


# --- hashes -------------------------------------------------------------------------


def test_block_hash_is_sha256_of_a_fixed_encoding() -> None:
    # Pinned: the same in every process and release, or Redis mirrors of replicas that
    # run different builds would silently stop matching.
    msgpack_of_none_1234_m = bytes.fromhex("93c0940102030491a16d")  # [nil, [1,2,3,4], ["m"]]
    expected = hashlib.sha256(msgpack_of_none_1234_m).digest()
    assert hash_block_tokens(None, [1, 2, 3, 4], ("m",)) == expected
    assert expected.hex().startswith("387de24865be8eab")


def test_hash_chain_depends_on_the_whole_prefix_and_the_extra_keys() -> None:
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(None, [1, 2, 3, 4]) == first  # a fresh call, same value
    assert hash_block_tokens(first, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 3, 4], ("model-a",)) != hash_block_tokens(None, [1, 2, 3, 4], ("model-b",))
    a: list[bytes] = []
    b: list[bytes] = []
    extend_block_hashes(a, [1, 2, 3, 4, 9, 9, 9, 9], 4)
    extend_block_hashes(b, [1, 2, 3, 5, 9, 9, 9, 9], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different parent


def test_hashes_are_incremental_and_cover_full_blocks_only() -> None:
    seq = tokens(0, 14)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, seq[:10], 4)
    assert len(hashes) == 2  # tokens 8, 9: a partial block, no hash
    before = list(hashes)
    extend_block_hashes(hashes, seq[:11], 4)
    assert hashes == before
    extend_block_hashes(hashes, seq[:12], 4)
    assert hashes[:2] == before and len(hashes) == 3
    all_at_once: list[bytes] = []
    extend_block_hashes(all_at_once, seq, 4)
    assert all_at_once == hashes


def test_stats_hit_rate() -> None:
    stats = PrefixCacheStats()
    assert stats.hit_rate == 0.0
    stats.record(num_tokens=20, num_hit_tokens=0)
    stats.record(num_tokens=20, num_hit_tokens=12)
    assert (stats.num_queries, stats.num_hits, stats.num_query_tokens, stats.num_hit_tokens) == (2, 1, 40, 12)
    assert stats.hit_rate == 12 / 40


# --- the scheduler reusing cached blocks --------------------------------------------


def test_new_request_reuses_the_longest_cached_chain() -> None:
    sched, executor, run = make_scheduler(), FakeExecutor(BLOCK_SIZE), Run()
    shared = tokens(0, 8)
    a = make_request("a", shared + tokens(50, 6), max_tokens=1)  # 14 tokens: 3 full blocks
    run_alone(sched, a, executor, run)
    a_blocks = first_admission(run, "a")[0].block_ids
    assert sched.block_pool.num_cached_blocks == 3  # finished, still findable

    b = make_request("b", shared + tokens(70, 7), max_tokens=3)  # shares blocks 0 and 1 only
    run_alone(sched, b, executor, run)
    new, count = first_admission(run, "b")
    assert new.num_computed_tokens == 8 and count == 15 - 8
    assert new.block_ids[:2] == a_blocks[:2]
    assert len(new.block_ids) == 4 and not set(new.block_ids[2:]) & set(a_blocks[:2])
    stats = sched.prefix_cache_stats
    assert (stats.num_queries, stats.num_hits, stats.num_hit_tokens, stats.num_query_tokens) == (2, 1, 8, 14 + 15)
    assert run.outputs["b"] == reference_output(b, 4096)[0]


def test_partial_block_is_not_cached() -> None:
    sched, executor, run = make_scheduler(), FakeExecutor(BLOCK_SIZE), Run()
    prompt = tokens(0, 10)
    run_alone(sched, make_request("a", prompt, max_tokens=1), executor, run)  # computes 10 tokens
    assert sched.block_pool.num_hashed_blocks == 2
    run_alone(sched, make_request("b", prompt + tokens(40, 6)), executor, run)
    new, _ = first_admission(run, "b")
    assert new.num_computed_tokens == 8  # tokens 8 and 9 were in a's partial block


def test_blocks_filled_by_generated_tokens_are_cached_too() -> None:
    sched, executor, run = make_scheduler(), FakeExecutor(BLOCK_SIZE), Run()
    a = make_request("a", tokens(0, 6), max_tokens=7)  # computes 6 + 6 = 12 tokens
    run_alone(sched, a, executor, run)
    assert sched.block_pool.num_hashed_blocks == 3
    continuation = a.prompt_token_ids + run.outputs["a"] + tokens(60, 3)  # a chat's next turn
    run_alone(sched, make_request("b", continuation), executor, run)
    assert first_admission(run, "b")[0].num_computed_tokens == 12


@pytest.mark.parametrize("prompt_len, expected_hit", [(4, 0), (8, 4), (9, 8)])
def test_fully_cached_prompt_still_computes_its_last_token(prompt_len: int, expected_hit: int) -> None:
    sched, executor, run = make_scheduler(), FakeExecutor(BLOCK_SIZE), Run()
    prompt = tokens(0, prompt_len)
    run_alone(sched, make_request("a", tokens(0, 12), max_tokens=2), executor, run)
    b = make_request("b", prompt, max_tokens=3)
    run_alone(sched, b, executor, run)
    new, count = first_admission(run, "b")
    # Every block of b's prompt is cached, but the model must see its last token to
    # sample: whole blocks are reused while at least one token is left to compute.
    assert new.num_computed_tokens == expected_hit
    assert count == prompt_len - expected_hit >= 1


def test_identical_prompts_in_one_step_compute_twice_and_cache_once() -> None:
    sched, executor, run = make_scheduler(), FakeExecutor(BLOCK_SIZE), Run()
    prompt = tokens(0, 8)
    sched.add_request(make_request("a", prompt, max_tokens=3))
    sched.add_request(make_request("b", prompt, max_tokens=3))
    step_once(sched, executor, run)
    (new_a, new_b), counts = run.steps[0].new_requests, run.steps[0].num_scheduled_tokens
    assert counts == [8, 8] and not set(new_a.block_ids) & set(new_b.block_ids)
    pool = sched.block_pool
    assert pool.num_hashed_blocks == 2  # first writer wins; b's copies stay private
    assert [pool.block_hash(b) is not None for b in new_a.block_ids] == [True, True]
    assert [pool.block_hash(b) for b in new_b.block_ids] == [None, None]
    run_to_completion(sched, executor, run)
    run_alone(sched, make_request("c", prompt + tokens(30, 2)), executor, run)
    assert first_admission(run, "c")[0].block_ids[:2] == new_a.block_ids


def test_eviction_is_lru_tail_first_and_reported() -> None:
    # 6 blocks of 4 tokens: after a, b and a's continuation d, the LRU order of cached
    # blocks is b1, b0, d2, a1, a0 (b was used before a's reuse; a request frees its
    # blocks last to first) with one block empty. c needs 4 blocks.
    sched, executor, run = make_scheduler(num_blocks=6), FakeExecutor(BLOCK_SIZE), Run()
    a_prompt, b_prompt = tokens(0, 8), tokens(20, 8)
    run_alone(sched, make_request("a", a_prompt, max_tokens=1), executor, run)
    run_alone(sched, make_request("b", b_prompt, max_tokens=1), executor, run)
    d = make_request("d", a_prompt + tokens(40, 4), max_tokens=1)
    run_alone(sched, d, executor, run)
    assert first_admission(run, "d")[0].num_computed_tokens == 8
    a_hashes: list[bytes] = []
    b_hashes: list[bytes] = []
    d_hashes: list[bytes] = []
    extend_block_hashes(a_hashes, a_prompt, BLOCK_SIZE, ("test-model",))
    extend_block_hashes(b_hashes, b_prompt, BLOCK_SIZE, ("test-model",))
    extend_block_hashes(d_hashes, d.prompt_token_ids, BLOCK_SIZE, ("test-model",))
    assert d_hashes[:2] == a_hashes
    events = sched.take_prefix_cache_events()
    assert [e for e in events if e.stored] == [
        PrefixCacheEvent(h, stored=True) for h in [*a_hashes, *b_hashes, *a_hashes, d_hashes[2]]
    ]  # cached a, cached b, hit a (last use: now), cached d's own block
    assert not [e for e in events if not e.stored]

    run_alone(sched, make_request("c", tokens(60, 16), max_tokens=1), executor, run)
    evicted = [e.block_hash for e in sched.take_prefix_cache_events() if not e.stored]
    assert evicted == [b_hashes[1], b_hashes[0], d_hashes[2]]
    pool = sched.block_pool
    assert all(pool.cached_block(h) is not None for h in a_hashes)
    assert all(pool.cached_block(h) is None for h in b_hashes)
    assert pool.num_free_blocks == pool.num_blocks == 6 and pool.num_cached_blocks == 6


def test_preempted_request_resumes_from_its_own_cached_blocks() -> None:
    # 6 blocks: b, d and c fill the pool; c (the latest) is preempted when it needs a
    # third block, b finishes in that step, and c comes back while its blocks are cached.
    sched, executor, run = make_scheduler(num_blocks=6), FakeExecutor(BLOCK_SIZE), Run()
    b = make_request("b", tokens(0, 7), max_tokens=2, arrival_time=0)
    d = make_request("d", tokens(20, 6), max_tokens=10, arrival_time=1)
    c = make_request("c", tokens(40, 8), max_tokens=10, arrival_time=2)
    for req in (b, d, c):
        sched.add_request(req)
    step_once(sched, executor, run)
    c_blocks = first_admission(run, "c")[0].block_ids
    step_once(sched, executor, run)
    assert run.steps[-1].dropped_request_ids == ["c"]  # preempted
    step_once(sched, executor, run)
    [resumed] = run.steps[-1].new_requests
    assert resumed.request_id == "c" and len(resumed.token_ids) == 9  # prompt + 1 output
    assert resumed.num_computed_tokens == 8 and resumed.block_ids[:2] == c_blocks
    assert run.steps[-1].num_scheduled_tokens[0] == 1  # only the token sampled before
    stats = sched.prefix_cache_stats
    assert (stats.num_queries, stats.num_hits, stats.num_hit_tokens) == (4, 1, 8)
    run_to_completion(sched, executor, run)  # more preemptions: c and d outgrow the pool
    for req in (b, d, c):
        assert run.outputs[req.request_id] == reference_output(req, 4096)[0]


def test_deltas_report_prompt_tokens_served_from_the_cache() -> None:
    sched, executor, run = make_scheduler(), FakeExecutor(BLOCK_SIZE), Run()
    prompt = tokens(0, 12)
    sched.add_request(make_request("a", prompt, max_tokens=2))
    deltas = step_once(sched, executor, run) + step_once(sched, executor, run)
    assert [d.num_cached_tokens for d in deltas] == [0, 0]
    sched.add_request(make_request("b", prompt + [7], max_tokens=2))
    sched.add_request(make_request("c", prompt + [7], max_tokens=5))
    deltas = step_once(sched, executor, run)
    assert {d.request_id: d.num_cached_tokens for d in deltas} == {"b": 12, "c": 12}
    [abort] = sched.abort_requests(["c"])
    assert abort.num_cached_tokens == 12
    run_to_completion(sched, executor, run)


def test_prefix_caching_off_reuses_nothing() -> None:
    sched, executor, run = make_scheduler(enable_prefix_caching=False), FakeExecutor(BLOCK_SIZE), Run()
    prompt = tokens(0, 12)
    run_alone(sched, make_request("a", prompt, max_tokens=2), executor, run)
    b = make_request("b", prompt + [7], max_tokens=2)
    run_alone(sched, b, executor, run)
    assert first_admission(run, "b")[0].num_computed_tokens == 0
    pool = sched.block_pool
    assert (pool.num_hashed_blocks, pool.num_cached_blocks) == (0, 0)
    assert b.block_hashes == [] and sched.take_prefix_cache_events() == []
    assert sched.prefix_cache_stats.num_queries == 0
    assert block_pool_status(sched).prefix_cache is None


def test_status_reports_cached_blocks_and_hit_rate() -> None:
    sched, executor, run = make_scheduler(num_blocks=16), FakeExecutor(BLOCK_SIZE), Run()
    prompt = tokens(0, 8)
    run_alone(sched, make_request("a", prompt, max_tokens=1), executor, run)
    run_alone(sched, make_request("b", prompt + [7, 8], max_tokens=1), executor, run)
    status = block_pool_status(sched)
    assert (status.num_free_blocks, status.num_used_blocks, status.num_cached_blocks) == (16, 0, 2)
    assert status.block_owners == [""] * 16  # cached blocks belong to nobody
    assert status.prefix_cache is not None
    assert (status.prefix_cache.num_queries, status.prefix_cache.num_hits) == (2, 1)
    assert status.prefix_cache.num_hit_tokens == 8
    assert status.prefix_cache.hit_rate == pytest.approx(8 / (8 + 10))


@pytest.mark.parametrize("seed", range(25))
def test_random_shared_prefix_workload_matches_reference(seed: int) -> None:
    """Chat-like traffic: a few system prompts, shared few-shot blocks, repeated user
    turns; tight pools so hits, evictions and preemptions interleave; random aborts.
    Outputs equal the reference, every hit reads the right tokens (the fake KV cache
    checks), nothing leaks."""
    rng = random.Random(seed)
    max_model_len = rng.choice([64, 128])
    min_blocks = -(-max_model_len // BLOCK_SIZE)
    sched = make_scheduler(
        num_blocks=rng.randint(min_blocks, 3 * min_blocks),
        max_model_len=max_model_len,
        max_num_seqs=rng.choice([1, 4, 8]),
        max_num_batched_tokens=rng.choice([8, 16, 64]),
    )
    executor, run = FakeExecutor(BLOCK_SIZE), Run()
    prefixes = [tokens(100 * i, rng.randint(1, max_model_len // 2)) for i in range(3)]
    requests: dict[str, Request] = {}
    aborted: set[str] = set()
    for step_index in range(5_000):
        if len(requests) < 30 and rng.random() < 0.4:
            prompt = rng.choice(prefixes) + [rng.randint(10, 30) for _ in range(rng.randint(0, 12))]
            prompt = prompt[: max_model_len - 2] or [11]
            req = make_request(f"r{len(requests)}", prompt, rng.randint(1, 12), float(step_index))
            sched.add_request(req)
            requests[req.request_id] = req
        if requests and rng.random() < 0.02:
            victim = rng.choice(sorted(requests))
            if sched.abort_requests([victim]):
                aborted.add(victim)
        if len(requests) == 30 and not sched.has_unfinished_requests():
            break
        step_once(sched, executor, run)
    else:
        raise AssertionError("workload did not finish")

    assert_all_free(sched)
    assert sched.prefix_cache_stats.num_hit_tokens > 0
    for request_id, req in requests.items():
        if request_id not in aborted:
            assert run.outputs[request_id] == reference_output(req, max_model_len)[0]
