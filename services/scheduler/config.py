"""The scheduler core's configuration: the one place its limits and their defaults live
(the engine, the scheduler service and the CLI take their defaults from here)."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

PreemptionMode = Literal["recompute", "swap"]
PREEMPTION_MODES: tuple[PreemptionMode, ...] = get_args(PreemptionMode)


class SchedulerConfig(msgspec.Struct, kw_only=True, frozen=True):
    max_model_len: int  # prompt + output tokens of one request
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens computed in one step, over all requests
    max_num_waiting: int = 1024  # bound of the waiting queue
    enable_prefix_caching: bool = True
    # Mixed into every block hash, so that caches of different models never match (in
    # Redis, where replicas of several models meet).
    model: str = ""
    # How a running request gives its blocks up when the pool runs dry: "recompute" (drop
    # its K/V, recompute prompt + output later) or "swap" (copy its blocks to the
    # executor's CPU swap pool and back later; recompute when the swap pool is full).
    preemption_mode: PreemptionMode = "recompute"

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_num_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"unknown preemption mode '{self.preemption_mode}' (choose from {', '.join(PREEMPTION_MODES)})"
            )

    @property
    def max_num_running(self) -> int:
        """The sequence cap actually applied. Running requests are scheduled in admission
        order and each decode costs one token: with more running requests than budget,
        the ones at the back would not decode until the front ones finished. Capping at
        the budget keeps every running request in every step."""
        return min(self.max_num_seqs, self.max_num_batched_tokens)
