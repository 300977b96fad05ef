"""The physical KV-cache blocks of one replica: ref counts, a free list, and the cached
full blocks that prefix caching keeps for reuse.

The scheduler is the only owner of this pool; the executor only ever sees block ids.
Every block is in exactly one of three states:
- *used*: ref count > 0, held by one or more requests (a cached block may be used too);
- *cached*: ref count 0 but holding the K/V of a full block with a hash, findable by that
  hash, in the LRU of evictable blocks;
- *empty*: ref count 0, no hash, on the free list.
Invariants:
- whoever took a reference (`allocate` or `incref`) gives it back with exactly one `free`;
- a block has a hash  <=>  the hash maps to it (one block per hash, one hash per block);
- `num_free_blocks` counts empty *and* cached blocks: both can be handed out by
  `allocate`, which takes empty blocks first and evicts cached ones, least recently used
  first, only when no empty block is left. So `num_free_blocks + num_used_blocks ==
  num_blocks` always, and with no request alive no block is used.

Freed blocks go to the back of their list and allocation takes from the front, so the
most recently freed are reused last. A request frees its blocks last-to-first, so of a
finished prefix the tail is evicted before the head (a chain is found from its head: a
head evicted first would strand the rest).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

from pagedserve.services.scheduler.prefix_cache import BlockHash, PrefixCacheEvent


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

    def __init__(self, num_blocks: int, block_size: int, *, record_events: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        # Made once: allocation and freeing only move ints between these structures.
        self._empty_block_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks
        self._hash_of_block: list[BlockHash | None] = [None] * num_blocks
        self._block_of_hash: dict[BlockHash, int] = {}
        # Cached blocks with ref count 0, least recently used first (values unused).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Only kept when someone drains them (`take_events`), else they would pile up.
        self._events: list[PrefixCacheEvent] | None = [] if record_events else None

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out: empty ones and cached ones it may evict."""
        return len(self._empty_block_ids) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with ref count 0 kept for their cached prefix (counted as free)."""
        return len(self._evictable)

    @property
    def num_hashed_blocks(self) -> int:
        """Blocks findable by hash, used or not."""
        return len(self._block_of_hash)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        self._check_id(block_id)
        return self._hash_of_block[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, each with ref count 1: empty ones first, then
        cached ones, least recently used first (their hashes are forgotten). All or
        nothing."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(num_blocks, self.num_free_blocks, self._num_blocks)
        block_ids = []
        for _ in range(num_blocks):
            if self._empty_block_ids:
                block_id = self._empty_block_ids.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add a reference to blocks in use (a forked sequence sharing them; copy-on-write
        happens before the first write into a shared block) or to cached blocks (a prefix
        cache hit: they leave the evictable LRU). An empty block cannot gain a reference
        here: it holds nothing worth sharing."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0 and block_id not in self._evictable:
                raise ValueError(f"cannot share KV block {block_id}: it is free")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
            block_hash = self._hash_of_block[block_id]
            if block_hash is not None and self._events is not None:
                self._events.append(PrefixCacheEvent(block_hash, stored=True))

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed id (an id may be listed more than once); a block
        whose count reaches 0 goes to the back of the free list, or of the cached LRU if
        it has a hash. Checked before anything changes, so a bad call leaves the pool as
        it was."""
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
                if self._hash_of_block[block_id] is None:
                    self._empty_block_ids.append(block_id)
                else:
                    self._evictable[block_id] = None

    # --- prefix cache ---------------------------------------------------------------

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Make a full, computed, used block findable by `block_hash`. First writer wins:
        False (and nothing changes) when another block already holds that hash, e.g. two
        requests with the same prompt computed it in the same step."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot cache KV block {block_id}: nobody holds it")
        if self._hash_of_block[block_id] is not None:
            raise ValueError(f"KV block {block_id} is already cached")
        if block_hash in self._block_of_hash:
            return False
        self._hash_of_block[block_id] = block_hash
        self._block_of_hash[block_hash] = block_id
        if self._events is not None:
            self._events.append(PrefixCacheEvent(block_hash, stored=True))
        return True

    def cached_block(self, block_hash: BlockHash) -> int | None:
        """The block holding `block_hash`, used or evictable; None on a miss."""
        return self._block_of_hash.get(block_hash)

    def take_events(self) -> list[PrefixCacheEvent]:
        """The prefix-cache events since the last call, oldest first (always empty unless
        the pool was made with `record_events=True`)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash_of_block[block_id]
        assert block_hash is not None, "only cached blocks are evictable"
        self._hash_of_block[block_id] = None
        del self._block_of_hash[block_hash]
        if self._events is not None:
            self._events.append(PrefixCacheEvent(block_hash, stored=False))

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self._num_blocks:
            raise ValueError(f"KV block id {block_id} out of range [0, {self._num_blocks})")
