"""The scheduler core's configuration: the one place its limits and their defaults live
(the engine, the scheduler service and the CLI take their defaults from here)."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

PreemptionMode = Literal["recompute", "swap"]
PREEMPTION_MODES: tuple[PreemptionMode, ...] = get_args(PreemptionMode)

# The defaults of the limits below, named so that the engine's and the scheduler
# service's configs and the CLI flags that mirror these fields share them.
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_WAITING = 1024
DEFAULT_ENABLE_PREFIX_CACHING = True
DEFAULT_PREEMPTION_MODE: PreemptionMode = "recompute"


class SchedulerConfig(msgspec.Struct, kw_only=True, frozen=True):
    max_model_len: int  # prompt + output tokens of one request
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # requests running at once
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # tokens computed in one step, over all requests
    max_num_waiting: int = DEFAULT_MAX_NUM_WAITING  # bound of the waiting queue
    enable_prefix_caching: bool = DEFAULT_ENABLE_PREFIX_CACHING
    # Mixed into every block hash, so that caches of different models never match (in
    # Redis, where replicas of several models meet).
    model: str = ""
    # How a running request gives its blocks up when the pool runs dry: "recompute" (drop
    # its K/V, recompute prompt + output later) or "swap" (copy its blocks to the
    # executor's CPU swap pool and back later; recompute when the swap pool is full).
    preemption_mode: PreemptionMode = DEFAULT_PREEMPTION_MODE

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
