"""The admin snapshot of a scheduler: queues, block pool, executors, step statistics.

Pure: built from the scheduler core and the service's bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgspec

from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import (
    BlockPoolStatus,
    ExecutorStatus,
    RequestSummary,
    StepStats,
)


@dataclass
class StepHistory:
    """Rolling window of the last 256 steps: (finished at monotonic s, batch size, tokens)."""

    num_steps: int = 0
    recent: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=256))

    def record(self, finished_at: float, batch_size: int, num_tokens: int) -> None:
        self.num_steps += 1
        self.recent.append((finished_at, batch_size, num_tokens))

    def stats(self, num_preemptions: int) -> StepStats:
        recent = list(self.recent)
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        return StepStats(
            num_steps=self.num_steps,
            steps_per_s=(len(recent) - 1) / span if span > 0 else 0.0,
            mean_batch_size=sum(r[1] for r in recent) / len(recent) if recent else 0.0,
            mean_tokens_per_step=sum(r[2] for r in recent) / len(recent) if recent else 0.0,
            num_preemptions=num_preemptions,
        )


_STATUS_NAMES = {RequestStatus.RUNNING: "running", RequestStatus.SWAPPED: "swapped"}


def request_status(req: Request) -> RequestSummary:
    return RequestSummary(
        request_id=req.request_id,
        status=_STATUS_NAMES.get(req.status, "waiting"),
        num_prompt_tokens=req.num_prompt_tokens,
        num_output_tokens=len(req.output_token_ids),
        num_computed_tokens=req.num_computed_tokens,
        max_tokens=req.sampling_params.max_tokens,
        num_preemptions=req.num_preemptions,
        arrival_time=req.arrival_time,
        block_ids=list(req.block_ids),
        parent_request_id=req.parent_request_id,
    )


def block_pool_status(scheduler: Scheduler) -> BlockPoolStatus:
    pool, swap_pool = scheduler.block_pool, scheduler.swap_pool
    owners = [""] * pool.num_blocks
    tokens_stored = 0
    slots_allocated = 0
    for req in scheduler.running:
        tokens_stored += min(req.num_computed_tokens, len(req.block_ids) * pool.block_size)
        slots_allocated += len(req.block_ids) * pool.block_size
        for block_id in req.block_ids:
            if block_id >= 0:  # a sliding window's dropped block (kv_groups.DROPPED) is nobody's
                owners[block_id] = req.request_id
    num_shared = 0
    for block_id in range(pool.num_blocks):
        if pool.ref_count(block_id) > 1:
            owners[block_id] = "*" + owners[block_id]
            num_shared += 1
    return BlockPoolStatus(
        num_blocks=pool.num_blocks,
        block_size=pool.block_size,
        num_free_blocks=pool.num_free_blocks,
        num_used_blocks=pool.num_used_blocks,
        num_cached_blocks=pool.num_cached_blocks,
        num_shared_blocks=num_shared,
        tokens_stored=tokens_stored,
        slots_allocated=slots_allocated,
        utilisation=scheduler.kv_utilisation(),
        block_owners=owners,
        # A copy: the core keeps counting into its own.
        prefix_cache=msgspec.structs.replace(scheduler.prefix_cache_stats) if scheduler.config.limits.enable_prefix_caching else None,
        num_swap_blocks=swap_pool.num_blocks if swap_pool else 0,
        num_used_swap_blocks=swap_pool.num_used_blocks if swap_pool else 0,
        num_swap_outs=scheduler.num_swap_outs_total,
        num_swap_ins=scheduler.num_swap_ins_total,
    )


def executor_status(
    executor_id: str,
    device: str,
    num_blocks: int,
    model: str,
    heartbeat_age_s: float,
    timeout_s: float,
    group_id: str = "",
    rank: int = 0,
    world_size: int = 1,
) -> ExecutorStatus:
    """One executor process; for a tensor-parallel group, one rank of it (its own device
    and capacity: the group serves with the smallest)."""
    return ExecutorStatus(
        executor_id=executor_id,
        device=device,
        num_blocks=num_blocks,
        model=model,
        last_heartbeat_age_s=heartbeat_age_s,
        alive=heartbeat_age_s <= timeout_s,
        group_id=group_id or executor_id,
        rank=rank,
        world_size=world_size,
    )
