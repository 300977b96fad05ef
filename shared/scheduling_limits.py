"""The scheduling limits: how much one replica takes on at once. One struct, embedded by
every config that carries them (the engine's `EngineConfig.limits`, the scheduler core's
`SchedulerConfig.limits`, the scheduler service's `SchedulerServiceConfig.limits`), so that
each limit and its default are written once. The executor sizes its persistent batch from
the same struct the scheduler fills that batch by.

It lives in shared/ because the executor (which must import nothing of the scheduler) and
the CLI of every process read it; it imports no torch.
"""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

PreemptionMode = Literal["recompute", "swap"]
PREEMPTION_MODES: tuple[PreemptionMode, ...] = get_args(PreemptionMode)


class SchedulingLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # Prompt + output tokens of one request. None: the model's max positions; the
    # scheduler core only ever sees it resolved (`resolved`).
    max_model_len: int | None = None
    max_num_seqs: int = 256  # requests running at once (the executor's batch rows)
    max_num_batched_tokens: int = 2048  # tokens computed in one step, over all requests
    max_num_waiting: int = 1024  # bound of the waiting queue (then 429)
    enable_prefix_caching: bool = True  # reuse the K/V of full blocks shared by prompts
    # How a running request gives its blocks up when the pool runs dry: "recompute" (drop
    # its K/V, recompute prompt + output later) or "swap" (copy its blocks to the
    # executor's CPU swap pool and back later; recompute when the swap pool is full).
    preemption_mode: PreemptionMode = "recompute"

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_num_waiting"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"unknown preemption mode '{self.preemption_mode}' (choose from {', '.join(PREEMPTION_MODES)})"
            )

    def resolved(self, model_max_len: int) -> SchedulingLimits:
        """These limits with `max_model_len` decided: the configured one, capped at what
        the model (or the executor that serves it) allows."""
        configured = self.max_model_len or model_max_len
        return msgspec.structs.replace(self, max_model_len=min(configured, model_max_len))

    @property
    def max_num_running(self) -> int:
        """The sequence cap actually applied. Running requests are scheduled in admission
        order and each decode costs one token: with more running requests than budget,
        the ones at the back would not decode until the front ones finished. Capping at
        the budget keeps every running request in every step."""
        return min(self.max_num_seqs, self.max_num_batched_tokens)
