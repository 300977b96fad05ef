"""BlockPool: free list and ref counts (services/scheduler/block_pool.py)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.scheduler.block_pool import BlockPool, NoFreeBlocksError


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
