"""The KV cache manager (services/scheduler/kv_cache_manager.py): block tables, prefix-cache
lookups and registration, sharing with forks and copy-on-write, on a real block pool."""

from __future__ import annotations

from pagedserve.services.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.services.scheduler.prefix_cache import PrefixCacheEvent
from pagedserve.services.scheduler.request import Request
from pagedserve.shared.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_manager(num_blocks: int = 16, enable_prefix_caching: bool = True, record_events: bool = False) -> KVCacheManager:
    return KVCacheManager(
        num_blocks,
        BLOCK_SIZE,
        enable_prefix_caching=enable_prefix_caching,
        hash_extra_keys=("model",),
        record_events=record_events,
    )


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8), arrival_time=0.0)


def compute_all(manager: KVCacheManager, req: Request) -> None:
    """Admit `req` with nothing cached, compute its whole prompt, register its full blocks."""
    manager.allocate_for_admission(req, [], req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    manager.register_full_blocks(req)


def test_a_computed_prefix_is_found_by_the_next_request_in_whole_blocks() -> None:
    manager = make_manager()
    first = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    compute_all(manager, first)
    assert first.num_registered_blocks == 2
    same_start = make_request("b", list(range(9)) + [99, 98, 97])
    assert manager.find_cached_prefix(same_start) == first.block_ids[:2]
    other = make_request("c", [5] + list(range(1, 12)))
    assert manager.find_cached_prefix(other) == []


def test_a_fully_cached_prompt_leaves_its_last_token_to_compute() -> None:
    manager = make_manager()
    first = make_request("a", list(range(8)))
    compute_all(manager, first)
    again = make_request("b", list(range(8)))
    assert manager.find_cached_prefix(again) == first.block_ids[:1]  # not both blocks


def test_admission_counts_revived_blocks_and_records_the_lookup() -> None:
    manager = make_manager(num_blocks=8)
    first = make_request("a", list(range(10)))
    compute_all(manager, first)
    manager.free(first)  # its 2 full blocks stay cached, counted as free
    assert (manager.num_free_blocks, manager.block_pool.num_cached_blocks) == (8, 2)
    second = make_request("b", list(range(10)))
    hit = manager.find_cached_prefix(second)
    # 2 hit blocks nobody holds + 1 block for the 2 tokens after them.
    assert manager.num_blocks_to_admit([(hit, 2)]) == 3
    assert manager.num_blocks_to_admit([(hit, 2), (hit, 2)]) == 4  # revived once, for both
    manager.take_cached_prefixes([hit])
    manager.allocate_for_admission(second, hit, 2)
    assert second.block_ids[:2] == hit and len(second.block_ids) == 3
    assert (second.num_computed_tokens, second.num_registered_blocks, second.num_cached_tokens) == (8, 2, 8)
    stats = manager.prefix_cache_stats
    assert (stats.num_queries, stats.num_hits, stats.num_query_tokens, stats.num_hit_tokens) == (2, 1, 20, 8)
    assert stats.hit_rate == 8 / 20


def test_with_prefix_caching_off_nothing_is_hashed_found_or_counted() -> None:
    manager = make_manager(enable_prefix_caching=False)
    first = make_request("a", list(range(10)))
    compute_all(manager, first)
    assert first.block_hashes == [] and manager.block_pool.num_hashed_blocks == 0
    assert manager.find_cached_prefix(make_request("b", list(range(10)))) == []
    assert manager.prefix_cache_stats.num_queries == 0


def test_a_fork_shares_every_block_and_copies_the_shared_last_one_on_write() -> None:
    manager = make_manager()
    parent = make_request("a", list(range(10)))
    compute_all(manager, parent)
    parent.output_token_ids.append(50)
    manager.hash_blocks(parent)
    child = make_request("a#1", list(range(10)))
    child.num_computed_tokens = parent.num_computed_tokens
    manager.share(parent, child, num_common_tokens=10)
    assert child.block_ids == parent.block_ids
    assert all(manager.block_pool.ref_count(b) == 2 for b in parent.block_ids)
    assert child.block_hashes == parent.block_hashes[:2]
    assert child.num_registered_blocks == parent.num_registered_blocks == 2
    # Both write position 10, in the shared third block: one copy is enough.
    assert manager.num_blocks_to_schedule(parent, 1) == manager.num_blocks_to_schedule(child, 1) == 1
    shared_last = parent.block_ids[-1]
    new_block_ids, num_replaced, _ = manager.allocate_slots(parent, 1)
    assert num_replaced == 1 and new_block_ids == [parent.block_ids[-1]] != [shared_last]
    assert manager.num_blocks_to_schedule(child, 1) == 0  # it holds the original alone now
    assert manager.allocate_slots(child, 1) == ([], 0, [])
    assert manager.take_block_copies() == [(shared_last, parent.block_ids[-1])]
    assert manager.take_block_copies() == []


def test_allocate_slots_adds_a_block_only_when_the_last_one_is_full() -> None:
    manager = make_manager()
    req = make_request("a", list(range(7)))
    manager.allocate_for_admission(req, [], 7)
    req.num_computed_tokens = 7
    assert manager.allocate_slots(req, 1) == ([], 0, [])  # position 7 fits in block 1
    req.num_computed_tokens = 8
    new_block_ids, num_replaced, _ = manager.allocate_slots(req, 1)
    assert num_replaced == 0 and len(new_block_ids) == 1 and req.block_ids[-1] == new_block_ids[0]


def test_free_gives_every_reference_back() -> None:
    manager = make_manager(num_blocks=4)
    req = make_request("a", list(range(10)))
    compute_all(manager, req)
    manager.free(req)
    assert (req.block_ids, req.num_registered_blocks) == ([], 0)
    assert manager.num_free_blocks == 4 and manager.block_pool.num_used_blocks == 0


def test_a_fresh_table_registers_its_full_blocks_again() -> None:
    manager = make_manager()
    req = make_request("a", list(range(10)))
    req.num_computed_tokens = 10
    manager.allocate_fresh(req, 3)
    assert req.num_registered_blocks == 2 and manager.block_pool.num_hashed_blocks == 2


def test_forgetting_cached_prefixes_evicts_them_all_and_says_so() -> None:
    manager = make_manager(record_events=True)
    req = make_request("a", list(range(10)))
    compute_all(manager, req)
    stored = manager.take_events()
    assert [e.stored for e in stored] == [True, True]
    manager.free(req)
    manager.forget_cached_prefixes()
    assert manager.block_pool.num_hashed_blocks == 0 and manager.num_free_blocks == 16
    # Freed tail first, so evicted tail first (see block_pool.py).
    assert manager.take_events() == [PrefixCacheEvent(e.block_hash, stored=False) for e in reversed(stored)]
    assert manager.find_cached_prefix(make_request("b", list(range(10)))) == []
