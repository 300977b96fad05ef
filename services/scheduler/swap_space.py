"""Preemption by swap (`preemption_mode="swap"`): the scheduler's map of the executor's
CPU swap pool, and the block copies between it and the device that the next step carries.

A victim's blocks are copied to swap blocks (`ExecuteStep.swap_out`) and its device blocks
freed; it waits in the scheduler's swapped queue holding its swap blocks, and comes back,
ahead of any waiting request, into fresh device blocks copied back from them
(`ExecuteStep.swap_in`), as a NewRequestData that starts at its `num_computed_tokens`:
nothing is recomputed. The executor copies every swap-out of a step before its swap-ins
and both before the forward, so a block freed by a swap-out may be handed to another
request in the same step.

The swap pool holds ids of the executor's swap blocks: no prefix caching there (a swap
block is read once, by the request that wrote it).
"""

from __future__ import annotations

from pagedserve.services.scheduler.block_pool import BlockPool
from pagedserve.services.scheduler.request import Request


class SwapSpace:
    def __init__(self, num_swap_blocks: int, block_size: int) -> None:
        """`num_swap_blocks` 0: the executor has no swap pool, so nothing is ever swapped."""
        self._pool = BlockPool(num_swap_blocks, block_size) if num_swap_blocks > 0 else None
        # The (source, destination) block pairs of the step being scheduled.
        self._swap_out_pairs: list[tuple[int, int]] = []
        self._swap_in_pairs: list[tuple[int, int]] = []
        self.num_swap_outs_total = 0
        self.num_swap_ins_total = 0

    @property
    def pool(self) -> BlockPool | None:
        return self._pool

    def can_hold(self, req: Request) -> bool:
        """Whether the swap pool has room for every block of `req`. Never for a request of
        several KV groups (sliding windows): its tables with their dropped blocks are not
        swapped, it is preempted by recompute, which is always correct."""
        return self._pool is not None and not req.num_dropped_blocks and len(req.block_ids) <= self._pool.num_free_blocks

    def swap_out(self, req: Request) -> None:
        """Take swap blocks for the device blocks of `req` and record the copies; the
        caller then frees the device blocks (see `can_hold` first)."""
        assert self._pool is not None
        req.swap_block_ids = self._pool.allocate(len(req.block_ids))
        self._swap_out_pairs.extend(zip(req.block_ids, req.swap_block_ids))
        self.num_swap_outs_total += 1

    def swap_in(self, req: Request) -> None:
        """Record the copies from the swap blocks of `req` into its fresh device blocks
        (`req.block_ids`, already allocated) and give the swap blocks back: the executor
        reads them at the start of the step, before any later swap-out can reuse them."""
        self._swap_in_pairs.extend(zip(req.swap_block_ids, req.block_ids))
        self.release(req)
        self.num_swap_ins_total += 1

    def release(self, req: Request) -> None:
        """Give back whatever swap blocks `req` holds (it finished, was aborted, swapped
        in, or the swap pool went with its executor)."""
        if req.swap_block_ids:
            assert self._pool is not None
            self._pool.free(req.swap_block_ids)
            req.swap_block_ids = []

    def take_swap_out(self) -> list[tuple[int, int]]:
        """(device block, swap block) pairs since the last call, for the step being sent."""
        pairs, self._swap_out_pairs = self._swap_out_pairs, []
        return pairs

    def take_swap_in(self) -> list[tuple[int, int]]:
        """(swap block, device block) pairs since the last call, for the step being sent."""
        pairs, self._swap_in_pairs = self._swap_in_pairs, []
        return pairs
