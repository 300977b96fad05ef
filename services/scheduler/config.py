"""The scheduler core's configuration: its limits (`SchedulingLimits`, shared with the
engine and the services, which own their defaults) resolved for one model."""

from __future__ import annotations

import msgspec

from pagedserve.shared.scheduling_limits import SchedulingLimits


class SchedulerConfig(msgspec.Struct, kw_only=True, frozen=True):
    # With max_model_len resolved (`SchedulingLimits.resolved`): a core needs a number.
    limits: SchedulingLimits
    # Mixed into every block hash, so that caches of different models never match (in
    # Redis, where replicas of several models meet).
    model: str = ""

    def __post_init__(self) -> None:
        if self.limits.max_model_len is None:
            raise ValueError("the scheduler core needs max_model_len resolved (SchedulingLimits.resolved)")

    @property
    def max_model_len(self) -> int:
        assert self.limits.max_model_len is not None  # __post_init__
        return self.limits.max_model_len

    @property
    def max_num_running(self) -> int:
        return self.limits.max_num_running
