"""The KV cache as the scheduler sees it: which blocks each request's table holds, which
of them come from the prefix cache, which must be copied before a write.

The scheduler never touches the block pool; it asks this manager, as vLLM v1's scheduler
asks its `KVCacheManager`:
- `find_cached_prefix`: the blocks holding the longest cached prefix of a request;
- `allocate_for_admission` / `allocate_fresh` / `allocate_slots`: a new block table (after
  a cached prefix, or for a swap-in), or the blocks a running request needs for a step;
- `share`: a fork's table, the same blocks as its parent's, one more reference each;
- `free`: give a request's blocks back;
- `register_full_blocks`: offer the blocks a step made full to the prefix cache.

It owns the `BlockPool`, the block hashes' extra keys, the copy-on-write pairs of the step
being scheduled and the prefix-cache statistics.

Who owns a block: the requests whose `block_ids` list it, from allocation (or a prefix
cache hit, or a fork) until each frees it with exactly one `free`. So when no request is
alive, no block is referenced: every block is free, empty or holding a cached prefix that
allocation may evict.

Prefix caching: when a block becomes full and computed it is registered under the hash of
its tokens and everything before them (`prefix_cache.py`); on admission a request (new or
resumed after preemption) takes the longest chain of cached blocks matching its tokens,
starts with `num_computed_tokens` past them, and computes only the rest. The executor needs
nothing more: a NewRequestData already says where computing starts.

Copy-on-write: forked sequences (parallel samples, beams) share their parent's blocks,
including a partly filled last one. The first write into that shared block gives the
writer a private copy (`ExecuteStep.block_copies`, done by the executor before the
forward); the last holder writes in place, so n sequences sharing a block make n - 1 copies.

KV groups (`kv_groups.py`): with sliding-window layers beside global ones a request holds
one table per group, all from the one pool; every rule above applies per table, a sliding
group's table drops (frees) the blocks before the window of the next token it computes,
and a prefix hit must be held by every group. With one global group (every model without
windows) the original single-table code runs, unchanged.
"""

from __future__ import annotations

from pagedserve.services.scheduler.block_pool import BlockPool
from pagedserve.services.scheduler.kv_groups import DROPPED, CachedPrefix, first_needed_block, group_block_hash
from pagedserve.services.scheduler.policy import blocks_to_cover
from pagedserve.services.scheduler.prefix_cache import PrefixCacheEvent, extend_block_hashes
from pagedserve.services.scheduler.request import Request
from pagedserve.shared.messages import PrefixCacheStats

_PLAIN_HASH_BYTES = 32  # a sha256 digest; other KV groups' keys carry their group number after it


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool,
        hash_extra_keys: tuple[str, ...],
        record_events: bool = False,
        group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        """`hash_extra_keys` are mixed into every block hash (the model name, so that
        caches of different models never match). `record_events`: keep the prefix-cache
        events for `take_events`. `group_windows`: each KV group's sliding window (None:
        global), `KVGroupLayout.windows`."""
        if not group_windows or any(w is not None and w < 1 for w in group_windows):
            raise ValueError(f"KV groups need windows of at least 1 token (or None): {group_windows}")
        self._pool = BlockPool(num_blocks, block_size, record_events=record_events)
        self._windows = tuple(group_windows)
        # One global group: every model without sliding windows, on the original code path.
        self._single = self._windows == (None,)
        self._enable_prefix_caching = enable_prefix_caching
        self._hash_extra_keys = hash_extra_keys
        self._stats = PrefixCacheStats()
        # The (source, destination) copy-on-write pairs of the step being scheduled.
        self._block_copies: list[tuple[int, int]] = []

    @property
    def block_pool(self) -> BlockPool:
        """For introspection (status page, tests): the scheduler goes through this class."""
        return self._pool

    @property
    def block_size(self) -> int:
        return self._pool.block_size

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free_blocks

    @property
    def num_groups(self) -> int:
        return len(self._windows)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self._stats

    # --- admission --------------------------------------------------------------------

    def hash_blocks(self, req: Request) -> None:
        """Hash the full blocks of tokens the request has gained (at most one per call
        after the prompt's), building the token list only when there is one."""
        if not self._enable_prefix_caching:
            return
        if req.num_tokens // self.block_size > len(req.block_hashes):
            extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, self._hash_extra_keys, req.cache_salt)

    def find_cached_prefix(self, req: Request) -> list[int] | CachedPrefix:
        """The blocks holding the longest cached prefix of the request's tokens, in order.
        Whole blocks only, and never all tokens: the step that samples the next token must
        run the model on the last one."""
        if not self._enable_prefix_caching:
            return self._no_hit()
        self.hash_blocks(req)
        if req.sampling_params.prompt_logprobs is not None and req.num_output_tokens == 0:
            # Its prompt logprobs need the logits of every prompt position: computed
            # whole, as vLLM does. Its blocks still join the cache for others.
            return self._no_hit()
        max_hit_blocks = (req.num_tokens - 1) // self.block_size
        if not self._single:
            return self._find_cached_prefix_in_groups(req.block_hashes[:max_hit_blocks])
        hit_block_ids: list[int] = []
        for block_hash in req.block_hashes[:max_hit_blocks]:
            block_id = self._pool.cached_block(block_hash)
            if block_id is None:
                break
            hit_block_ids.append(block_id)
        return hit_block_ids

    def num_blocks_to_admit(self, admissions: list[tuple[list[int] | CachedPrefix, int]]) -> int:
        """Free blocks needed to admit requests at once, each given as (its cached prefix,
        tokens to compute after it). A hit on a cached block nobody holds takes it out of
        the free blocks too."""
        if not self._single:
            return self._num_blocks_to_admit_in_groups(admissions)
        revived = {b for hit, _ in admissions for b in hit if self._pool.ref_count(b) == 0}
        num_new_blocks = sum(
            blocks_to_cover(len(hit) * self.block_size + num_new, self.block_size) - len(hit)
            for hit, num_new in admissions
        )
        return num_new_blocks + len(revived)

    def take_cached_prefixes(self, hits: list[list[int] | CachedPrefix]) -> None:
        """Reference the hit blocks of requests about to be admitted together, all before
        `allocate_for_admission` allocates, which could otherwise evict them."""
        for hit_block_ids in hits:
            self._pool.incref(hit_block_ids if self._single else hit_block_ids.held_block_ids())

    def allocate_for_admission(self, req: Request, hit_block_ids: list[int] | CachedPrefix, num_new_tokens: int) -> None:
        """Give a waiting request its block table: its cached prefix (referenced by
        `take_cached_prefixes`) and blocks for the `num_new_tokens` it computes next.
        It starts computing after the prefix."""
        if not self._single:
            self._allocate_for_admission_in_groups(req, hit_block_ids, num_new_tokens)
            return
        num_hit_tokens = len(hit_block_ids) * self.block_size
        num_new_blocks = blocks_to_cover(num_hit_tokens + num_new_tokens, self.block_size) - len(hit_block_ids)
        req.block_ids = hit_block_ids + self._pool.allocate(num_new_blocks)
        req.num_computed_tokens = num_hit_tokens
        req.num_registered_blocks = len(hit_block_ids)
        if self._enable_prefix_caching:
            self._stats.record(req.num_tokens, num_hit_tokens)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit_tokens

    def allocate_fresh(self, req: Request, num_blocks: int) -> None:
        """A new table of `num_blocks` blocks for a request whose K/V will be copied in
        before the step reads them (a swap-in). Its full blocks are offered to the prefix
        cache again (a hash still cached in the block it left keeps that block: first one
        wins). One KV group only: `SwapSpace.can_hold` never swaps a request of several."""
        assert self._single, "requests of several KV groups are never swapped"
        req.block_ids = self._pool.allocate(num_blocks)
        req.num_registered_blocks = 0
        self.register_full_blocks(req)

    # --- running requests -------------------------------------------------------------

    def num_blocks_to_schedule(self, req: Request, num_new_tokens: int) -> int:
        """Free blocks `allocate_slots(req, num_new_tokens)` takes: the table's growth, and
        one for the copy of a shared block the step writes into."""
        num_covered = req.num_computed_tokens + num_new_tokens
        if not self._single:
            return self._num_blocks_to_schedule_in_groups(req, num_covered, num_new_tokens)
        num_new_blocks = blocks_to_cover(num_covered, self.block_size) - len(req.block_ids)
        return num_new_blocks + (num_new_tokens > 0 and self._shared_write_block(req) is not None)

    def allocate_slots(
        self, req: Request, num_new_tokens: int
    ) -> tuple[list[int], int, list[tuple[list[int], int]]]:
        """Make the table of a running request cover the tokens computed after this step:
        copy-on-write of a shared block it writes into, then new blocks (none until the
        last block is full: waste stays under one block per request). Returns the block
        ids new to the executor and how many of them replace the end of its table (0 or
        1), and the same for each KV group after the first (none with one group)."""
        if not self._single:
            return self._allocate_slots_in_groups(req, num_new_tokens)
        num_blocks_before = len(req.block_ids)
        num_replaced = self._copy_on_write(req)
        num_covered = req.num_computed_tokens + num_new_tokens
        num_new_blocks = blocks_to_cover(num_covered, self.block_size) - len(req.block_ids)
        req.block_ids.extend(self._pool.allocate(num_new_blocks))
        return req.block_ids[num_blocks_before - num_replaced :], num_replaced, []

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write pairs since the last call, for the step being sent."""
        block_copies, self._block_copies = self._block_copies, []
        return block_copies

    def share(self, parent: Request, child: Request, num_common_tokens: int) -> None:
        """Give a fork `child` every block of `parent` (one more reference each) and the
        hashes of the full blocks of their first `num_common_tokens` tokens, which both
        hold. Copy-on-write happens before either writes into a shared block."""
        if not self._single:
            self._pool.incref(b for table in self._tables(parent) for b in table if b != DROPPED)
            child.group_block_ids = [list(table) for table in parent.group_block_ids]
            child.num_dropped_blocks = list(parent.num_dropped_blocks)
        else:
            self._pool.incref(parent.block_ids)
        child.block_ids = list(parent.block_ids)
        child.num_registered_blocks = parent.num_registered_blocks
        child.block_hashes = parent.block_hashes[: num_common_tokens // self.block_size]

    def free(self, req: Request) -> None:
        """Drop the request's references to its blocks."""
        if not self._single:
            for table in self._tables(req):
                self._pool.free(b for b in reversed(table) if b != DROPPED)  # tail first: see block_pool.py
            req.group_block_ids, req.num_dropped_blocks = [], []
        else:
            self._pool.free(reversed(req.block_ids))  # tail first: see block_pool.py
        req.block_ids = []
        req.num_registered_blocks = 0

    def register_full_blocks(self, req: Request, num_computed_tokens: int | None = None) -> None:
        """Offer the blocks the last step made full (and computed) to the prefix cache.
        `num_computed_tokens`: how many of the request's tokens a result has confirmed
        (default: `req.num_computed_tokens`, which also counts steps still in flight)."""
        if not self._enable_prefix_caching:
            return
        if num_computed_tokens is None:
            num_computed_tokens = req.num_computed_tokens
        num_full_blocks = num_computed_tokens // self.block_size
        if num_full_blocks <= req.num_registered_blocks:
            return
        self.hash_blocks(req)
        if not self._single:
            for group, table in enumerate(self._tables(req)):
                for index in range(req.num_registered_blocks, num_full_blocks):
                    if table[index] != DROPPED:  # a window may drop a block before its result
                        self._pool.cache_block(table[index], group_block_hash(req.block_hashes[index], group))
            req.num_registered_blocks = num_full_blocks
            return
        for index in range(req.num_registered_blocks, num_full_blocks):
            # False for a block another request computed first: this copy stays private.
            self._pool.cache_block(req.block_ids[index], req.block_hashes[index])
        req.num_registered_blocks = num_full_blocks

    # --- the whole cache --------------------------------------------------------------

    def forget_cached_prefixes(self) -> None:
        """The K/V went with the executor's cache. Only when no request holds a block:
        taking every free block then evicts each cached one (recording the eviction), and
        giving them back empties them."""
        assert self._pool.num_used_blocks == 0, "a request still holds blocks"
        self._pool.free(self._pool.allocate(self._pool.num_free_blocks))

    def take_events(self) -> list[PrefixCacheEvent]:
        """Blocks cached, reused or evicted since the last call, oldest first: of the first
        KV group only, whose keys are the plain token hashes the gateways route by."""
        events = self._pool.take_events()
        if self._single:
            return events
        return [event for event in events if len(event.block_hash) == _PLAIN_HASH_BYTES]

    def _shared_write_block(self, req: Request) -> int | None:
        """The index in `req.block_ids` of the block its next token is written into, when
        another request holds it too: a partly filled last block shared by forks. (Full
        shared blocks, forked or prefix-cached, lie before `num_computed_tokens` and are
        only read.)"""
        index = req.num_computed_tokens // self.block_size
        if index < len(req.block_ids) and self._pool.ref_count(req.block_ids[index]) > 1:
            return index
        return None

    def _copy_on_write(self, req: Request) -> int:
        """Give `req` a private copy of the shared block it is about to write into (the
        executor copies the K/V before the step's forward) and drop its reference to the
        original, which the other holders keep. Returns the number of blocks replaced at
        the end of the table (0 or 1)."""
        index = self._shared_write_block(req)
        if index is None:
            return 0
        # Only the last block can be partly filled, so the replaced block is the last one.
        assert index == len(req.block_ids) - 1, f"{req!r}: shared block {index} is not the last"
        source = req.block_ids[index]
        (destination,) = self._pool.allocate(1)
        self._pool.free([source])
        req.block_ids[index] = destination
        self._block_copies.append((source, destination))
        return 1

    # --- several KV groups (kv_groups.py) ----------------------------------------------

    def _no_hit(self) -> list[int] | CachedPrefix:
        return [] if self._single else CachedPrefix(0, [[] for _ in self._windows])

    @staticmethod
    def _tables(req: Request) -> list[list[int]]:
        return [req.block_ids, *req.group_block_ids]

    def _find_cached_prefix_in_groups(self, block_hashes: list[bytes]) -> CachedPrefix:
        """The longest hit every group holds: a global group all blocks before its end, a
        sliding group the blocks of the window of the first token computed after it."""
        size = self.block_size
        cached = [
            [self._pool.cached_block(group_block_hash(h, group)) for h in block_hashes]
            for group in range(len(self._windows))
        ]
        num_blocks = len(block_hashes)
        for group, window in enumerate(self._windows):
            if window is None:  # a chain from the first block
                num_blocks = next((i for i, b in enumerate(cached[group][:num_blocks]) if b is None), num_blocks)
        while num_blocks > 0 and not all(
            None not in cached[group][first_needed_block(num_blocks * size, window, size) : num_blocks]
            for group, window in enumerate(self._windows)
            if window is not None
        ):
            num_blocks -= 1
        tables = []
        for group, window in enumerate(self._windows):
            first = first_needed_block(num_blocks * size, window, size)
            tables.append([DROPPED] * first + cached[group][first:num_blocks])
        return CachedPrefix(num_blocks, tables)

    def _num_blocks_to_admit_in_groups(self, admissions: list[tuple[CachedPrefix, int]]) -> int:
        revived = {b for hit, _ in admissions for b in hit.held_block_ids() if self._pool.ref_count(b) == 0}
        size = self.block_size
        num_new_blocks = sum(
            blocks_to_cover(hit.num_blocks * size + num_new, size) - hit.num_blocks for hit, num_new in admissions
        )
        return num_new_blocks * len(self._windows) + len(revived)

    def _allocate_for_admission_in_groups(self, req: Request, hit: CachedPrefix, num_new_tokens: int) -> None:
        """Every group's table: the hit (a sliding group's from its window on) and blocks
        for the tokens computed next."""
        num_hit_tokens = hit.num_blocks * self.block_size
        num_blocks = blocks_to_cover(num_hit_tokens + num_new_tokens, self.block_size)
        tables = [table + self._pool.allocate(num_blocks - hit.num_blocks) for table in hit.block_tables]
        req.block_ids, req.group_block_ids = tables[0], tables[1:]
        req.num_dropped_blocks = [
            first_needed_block(num_hit_tokens, window, self.block_size) for window in self._windows
        ]
        req.num_computed_tokens = num_hit_tokens
        req.num_registered_blocks = hit.num_blocks
        if self._enable_prefix_caching:
            self._stats.record(req.num_tokens, num_hit_tokens)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit_tokens

    def _droppable(self, req: Request, group: int) -> range:
        """Indices of `group`'s table that the request's next token computed no longer
        reads and that are still held."""
        window = self._windows[group]
        if window is None:
            return range(0)
        first = first_needed_block(req.num_computed_tokens, window, self.block_size)
        return range(req.num_dropped_blocks[group], first)

    def _num_blocks_to_schedule_in_groups(self, req: Request, num_covered: int, num_new_tokens: int) -> int:
        """Growth and copies of every table, less the blocks its windows give back to the
        pool (held by the request alone) before allocating; never below 0, so a request's
        surplus is not counted on for a gang member allocated before it."""
        num_table_blocks = blocks_to_cover(num_covered, self.block_size)
        write_index = req.num_computed_tokens // self.block_size
        need = 0
        for group, table in enumerate(self._tables(req)):
            need += num_table_blocks - len(table)
            if num_new_tokens > 0 and write_index < len(table) and self._pool.ref_count(table[write_index]) > 1:
                need += 1
            need -= sum(
                1 for i in self._droppable(req, group) if table[i] != DROPPED and self._pool.ref_count(table[i]) == 1
            )
        return max(need, 0)

    def _allocate_slots_in_groups(
        self, req: Request, num_new_tokens: int
    ) -> tuple[list[int], int, list[tuple[list[int], int]]]:
        """`allocate_slots` for each table: first the blocks every window has left go back
        to the pool (so this very step may reuse them, in any group: what
        `num_blocks_to_schedule` counted on), then copy-on-write, then growth."""
        num_table_blocks = blocks_to_cover(req.num_computed_tokens + num_new_tokens, self.block_size)
        write_index = req.num_computed_tokens // self.block_size
        tables = self._tables(req)
        for group, table in enumerate(tables):
            dropped = self._droppable(req, group)
            if dropped:
                self._pool.free(table[i] for i in reversed(dropped) if table[i] != DROPPED)
                table[dropped.start : dropped.stop] = [DROPPED] * len(dropped)
                req.num_dropped_blocks[group] = dropped.stop
        deltas: list[tuple[list[int], int]] = []
        for table in tables:
            num_blocks_before = len(table)
            num_replaced = 0
            if write_index < len(table) and self._pool.ref_count(table[write_index]) > 1:
                assert write_index == len(table) - 1, f"{req!r}: shared block {write_index} is not the last"
                source = table[write_index]
                (table[write_index],) = self._pool.allocate(1)
                self._pool.free([source])
                self._block_copies.append((source, table[write_index]))
                num_replaced = 1
            table.extend(self._pool.allocate(num_table_blocks - len(table)))
            deltas.append((table[num_blocks_before - num_replaced :], num_replaced))
        return deltas[0][0], deltas[0][1], deltas[1:]
