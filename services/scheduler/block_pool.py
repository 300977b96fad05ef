"""The physical KV-cache blocks of one replica: a free list and a ref count per block.

The scheduler is the only owner of this pool; the executor only ever sees block ids.
Invariants:
- a block is on the free list  <=>  its ref count is 0;
- whoever took a reference (`allocate` or `incref`) gives it back with exactly one `free`.

Prefix caching will later keep full blocks with ref count 0 *off* the free list (cached,
evicted LRU when the free list runs dry); `allocate` and `incref` are the two places that
will learn about it. Freed blocks go to the back of the free list and allocation takes
from the front, so the most recently freed blocks are reused last: that order is what the
cache's LRU eviction will want.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    """More blocks were asked for than are free. The scheduler checks `num_free_blocks`
    first and preempts instead, so seeing this means a policy bug, not a full cache."""

    def __init__(self, num_requested: int, num_free: int, num_blocks: int) -> None:
        self.num_requested = num_requested
        self.num_free = num_free
        self.num_blocks = num_blocks
        super().__init__(
            f"asked for {num_requested:,} KV blocks but only {num_free:,} of "
            f"{num_blocks:,} are free"
        )


class BlockPool:
    """`num_blocks` blocks of `block_size` token slots each, ids 0 .. num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        # Made once: allocation and freeing only move ints between these two structures.
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free_block_ids)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, each with ref count 1. All or nothing."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks > len(self._free_block_ids):
            raise NoFreeBlocksError(num_blocks, len(self._free_block_ids), self._num_blocks)
        block_ids = [self._free_block_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add a reference to blocks in use (a forked sequence sharing them; copy-on-write
        happens before the first write into a shared block). A free block cannot gain a
        reference here: it holds nothing worth sharing."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"cannot share KV block {block_id}: it is free")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed id (an id may be listed more than once); a block
        whose count reaches 0 goes back to the free list. Checked before anything changes,
        so a bad call leaves the pool as it was."""
        drops = Counter(block_ids)
        for block_id, num_drops in drops.items():
            self._check_id(block_id)
            if num_drops > self._ref_counts[block_id]:
                raise ValueError(
                    f"double free of KV block {block_id}: ref count "
                    f"{self._ref_counts[block_id]}, freed {num_drops} time(s)"
                )
        for block_id, num_drops in drops.items():
            self._ref_counts[block_id] -= num_drops
            if self._ref_counts[block_id] == 0:
                self._free_block_ids.append(block_id)

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self._num_blocks:
            raise ValueError(f"KV block id {block_id} out of range [0, {self._num_blocks})")
