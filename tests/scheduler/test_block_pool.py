"""BlockPool: free list, ref counts and cached blocks (services/scheduler/block_pool.py)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedserve.services.scheduler.block_pool import BlockPool, NoFreeBlocksError
from pagedserve.services.scheduler.prefix_cache import PrefixCacheEvent


def test_starts_all_free() -> None:
    pool = BlockPool(num_blocks=8, block_size=16)
    assert (pool.num_blocks, pool.block_size) == (8, 16)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (8, 0)
    assert all(pool.ref_count(b) == 0 for b in range(8))


def test_allocate_gives_distinct_blocks_with_one_ref() -> None:
    pool = BlockPool(8, 4)
    first, second = pool.allocate(3), pool.allocate(5)
    assert len(set(first + second)) == 8
    assert all(pool.ref_count(b) == 1 for b in first + second)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (0, 8)
    assert pool.allocate(0) == []


def test_allocate_too_many_raises_with_numbers_and_changes_nothing() -> None:
    pool = BlockPool(1024, 16)
    pool.allocate(1000)
    with pytest.raises(NoFreeBlocksError) as excinfo:
        pool.allocate(25)
    message = str(excinfo.value)
    assert "25" in message and "24" in message and "1,024" in message
    assert (excinfo.value.num_requested, excinfo.value.num_free) == (25, 24)
    assert pool.num_free_blocks == 24


def test_free_returns_blocks_to_the_back_of_the_free_list() -> None:
    pool = BlockPool(4, 4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    assert all(pool.ref_count(b) == 0 for b in blocks)
    # The two never-used blocks come out before the just-freed ones (LRU order, which
    # prefix caching will rely on).
    assert pool.allocate(4)[:2] == [2, 3]


def test_shared_block_is_freed_only_by_its_last_reference() -> None:
    pool = BlockPool(4, 4)
    [block] = pool.allocate(1)
    pool.incref([block])
    assert pool.ref_count(block) == 2
    pool.free([block])
    assert (pool.ref_count(block), pool.num_free_blocks) == (1, 3)
    pool.free([block])
    assert (pool.ref_count(block), pool.num_free_blocks) == (0, 4)


def test_double_free_is_an_error_and_changes_nothing() -> None:
    pool = BlockPool(4, 4)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match=f"double free of KV block {a}"):
        pool.free([b, a])
    assert pool.ref_count(b) == 1  # b was not freed either
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, b])
    assert pool.ref_count(b) == 1


def test_incref_of_a_free_block_or_bad_id_is_an_error() -> None:
    pool = BlockPool(4, 4)
    with pytest.raises(ValueError, match="free"):
        pool.incref([0])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([4])
    with pytest.raises(ValueError, match="out of range"):
        pool.ref_count(-1)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0)])
def test_rejects_empty_pool(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockPool(num_blocks, block_size)


class BlockPoolMachine(RuleBasedStateMachine):
    """Random allocate / incref / free sequences against a dict of expected ref counts."""

    NUM_BLOCKS = 12

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(self.NUM_BLOCKS, 4)
        self.refs: dict[int, int] = {}  # block id -> expected ref count (> 0)

    @rule(n=st.integers(0, 14))
    def allocate(self, n: int) -> None:
        num_free = self.NUM_BLOCKS - len(self.refs)
        if n > num_free:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            return
        blocks = self.pool.allocate(n)
        assert len(set(blocks)) == n and not set(blocks) & set(self.refs)
        self.refs.update((b, 1) for b in blocks)

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def incref(self, data: st.DataObject) -> None:
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.refs)), max_size=4))
        self.pool.incref(blocks)
        for b in blocks:
            self.refs[b] += 1

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.refs)), max_size=4, unique=True))
        self.pool.free(blocks)
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]

    @rule(block=st.integers(0, NUM_BLOCKS - 1))
    def free_of_a_free_block_fails(self, block: int) -> None:
        if block not in self.refs:
            with pytest.raises(ValueError):
                self.pool.free([block])

    @invariant()
    def ref_counts_match(self) -> None:
        for b in range(self.NUM_BLOCKS):
            assert self.pool.ref_count(b) == self.refs.get(b, 0)
        assert self.pool.num_used_blocks == len(self.refs)
        assert self.pool.num_free_blocks + self.pool.num_used_blocks == self.NUM_BLOCKS


BlockPoolMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestBlockPoolRefCounts = BlockPoolMachine.TestCase


# --- prefix cache: cached blocks, hits, LRU eviction ---------------------------------


def test_cached_block_outlives_its_last_reference_and_counts_as_free() -> None:
    pool = BlockPool(4, 4, record_events=True)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"A") is True
    pool.free([a, b])
    # a keeps its K/V and its hash, b is simply empty; both can be allocated.
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.num_cached_blocks) == (4, 0, 1)
    assert pool.cached_block(b"A") == a and pool.block_hash(a) == b"A"
    assert pool.cached_block(b"B") is None and pool.block_hash(b) is None
    assert pool.take_events() == [PrefixCacheEvent(b"A", stored=True)]
    assert pool.take_events() == []


def test_hit_on_a_cached_block_takes_it_out_of_the_evictable_ones() -> None:
    pool = BlockPool(2, 4, record_events=True)
    [a] = pool.allocate(1)
    pool.cache_block(a, b"A")
    pool.free([a])
    pool.take_events()
    pool.incref([a])  # a prefix-cache hit
    assert (pool.ref_count(a), pool.num_cached_blocks, pool.num_free_blocks) == (1, 0, 1)
    assert pool.take_events() == [PrefixCacheEvent(b"A", stored=True)]  # last use: now
    [other] = pool.allocate(1)
    assert other != a  # a is held again: not evictable
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    assert pool.cached_block(b"A") == a


def test_empty_blocks_go_before_cached_ones_then_least_recently_used_first() -> None:
    pool = BlockPool(5, 4, record_events=True)
    blocks = pool.allocate(4)
    for block, name in zip(blocks, [b"0", b"1", b"2", b"3"]):
        pool.cache_block(block, name)
    pool.free([blocks[2]])
    pool.free([blocks[0], blocks[3]])
    pool.free([blocks[1]])  # LRU order now: 2, 0, 3, 1
    pool.take_events()
    assert pool.num_cached_blocks == 4 and pool.num_free_blocks == 5
    [empty] = pool.allocate(1)
    assert empty == 4 and pool.num_cached_blocks == 4  # the never-used block, no eviction
    assert pool.allocate(2) == [blocks[2], blocks[0]]
    assert pool.take_events() == [PrefixCacheEvent(b"2", stored=False), PrefixCacheEvent(b"0", stored=False)]
    assert pool.cached_block(b"2") is None and pool.cached_block(b"0") is None
    assert pool.block_hash(blocks[2]) is None
    assert pool.cached_block(b"3") == blocks[3] and pool.num_cached_blocks == 2


def test_first_writer_wins_and_bad_cache_calls_fail() -> None:
    pool = BlockPool(4, 4)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"same") is True
    assert pool.cache_block(b, b"same") is False  # a duplicate: b stays private
    assert pool.cached_block(b"same") == a and pool.block_hash(b) is None
    with pytest.raises(ValueError, match="already cached"):
        pool.cache_block(a, b"other")
    pool.free([b])
    with pytest.raises(ValueError, match="nobody holds it"):
        pool.cache_block(b, b"other")
    with pytest.raises(ValueError, match="free"):
        pool.incref([b])  # empty: nothing worth sharing
    assert pool.take_events() == []  # not recording


class CachingBlockPoolMachine(RuleBasedStateMachine):
    """Random allocate / fork (incref) / free / cache / hit sequences against a model of
    the three states (used, cached, empty) and of the LRU order of cached blocks."""

    NUM_BLOCKS = 8
    HASHES = [bytes([i]) for i in range(6)]  # few, so duplicates and re-caching happen

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(self.NUM_BLOCKS, 4, record_events=True)
        self.refs: dict[int, int] = {}  # used block -> expected ref count
        self.hash_of: dict[int, bytes] = {}  # block (used or cached) -> its hash
        self.lru: list[int] = []  # cached blocks with ref count 0, least recently used first
        self.events: list[PrefixCacheEvent] = []

    @rule(n=st.integers(0, 10))
    def allocate(self, n: int) -> None:
        num_empty = self.NUM_BLOCKS - len(self.refs) - len(self.lru)
        if n > num_empty + len(self.lru):
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            return
        blocks = self.pool.allocate(n)
        assert len(set(blocks)) == n
        assert not set(blocks) & set(self.refs), "handed out a block somebody holds"
        num_evicted = max(0, n - num_empty)
        evicted, self.lru = self.lru[:num_evicted], self.lru[num_evicted:]
        assert blocks[n - num_evicted :] == evicted, "evicted out of LRU order, or before empty blocks"
        for block in evicted:
            self.events.append(PrefixCacheEvent(self.hash_of.pop(block), stored=False))
        self.refs.update((b, 1) for b in blocks)

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.refs)), max_size=4))
        self.pool.incref(blocks)
        for b in blocks:
            self.refs[b] += 1
            if b in self.hash_of:
                self.events.append(PrefixCacheEvent(self.hash_of[b], stored=True))

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.refs)), max_size=4, unique=True))
        self.pool.free(blocks)
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]
                if b in self.hash_of:
                    self.lru.append(b)

    @precondition(lambda self: any(b not in self.hash_of for b in self.refs))
    @rule(data=st.data(), block_hash=st.sampled_from(HASHES))
    def cache(self, data: st.DataObject, block_hash: bytes) -> None:
        block = data.draw(st.sampled_from(sorted(b for b in self.refs if b not in self.hash_of)))
        is_new = block_hash not in self.hash_of.values()
        assert self.pool.cache_block(block, block_hash) is is_new
        if is_new:
            self.hash_of[block] = block_hash
            self.events.append(PrefixCacheEvent(block_hash, stored=True))

    @rule(block_hash=st.sampled_from(HASHES))
    def hit(self, block_hash: bytes) -> None:
        block = self.pool.cached_block(block_hash)
        expected = next((b for b, h in self.hash_of.items() if h == block_hash), None)
        assert block == expected
        if block is None:
            return
        self.pool.incref([block])
        if block in self.lru:
            self.lru.remove(block)
        self.refs[block] = self.refs.get(block, 0) + 1
        self.events.append(PrefixCacheEvent(block_hash, stored=True))

    @rule(block=st.integers(0, NUM_BLOCKS - 1))
    def free_of_an_unreferenced_block_fails(self, block: int) -> None:
        if block not in self.refs:
            with pytest.raises(ValueError, match="double free"):
                self.pool.free([block])

    @invariant()
    def pool_matches_the_model(self) -> None:
        pool = self.pool
        for b in range(self.NUM_BLOCKS):
            assert pool.ref_count(b) == self.refs.get(b, 0)
            assert pool.block_hash(b) == self.hash_of.get(b)
        num_empty = self.NUM_BLOCKS - len(self.refs) - len(self.lru)
        assert num_empty >= 0
        assert pool.num_used_blocks == len(self.refs)
        assert pool.num_cached_blocks == len(self.lru)
        assert pool.num_free_blocks == num_empty + len(self.lru)
        assert pool.num_free_blocks + pool.num_used_blocks == self.NUM_BLOCKS
        assert pool.num_hashed_blocks == len(self.hash_of)
        for b, h in self.hash_of.items():
            assert pool.cached_block(h) == b
        assert pool.take_events() == self.events
        self.events = []

    def teardown(self) -> None:
        # Dropping every reference leaks nothing: all blocks free, cached ones still found.
        for block, count in list(self.refs.items()):
            self.pool.free([block] * count)
        assert self.pool.num_free_blocks == self.NUM_BLOCKS
        assert self.pool.num_cached_blocks == len(self.hash_of)
        assert self.pool.allocate(self.NUM_BLOCKS)  # and every one can be handed out
        assert self.pool.num_hashed_blocks == 0


CachingBlockPoolMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
TestCachingBlockPool = CachingBlockPoolMachine.TestCase
