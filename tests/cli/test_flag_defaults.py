"""Defaults defined once: the scheduling limits and the preemption mode of every
subcommand, of EngineConfig and of SchedulerServiceConfig are SchedulerConfig's
(services/scheduler/config.py), and --preemption-mode offers exactly its modes."""

from __future__ import annotations

import pytest

from pagedserve.services.cli import build_parser
from pagedserve.services.executor.config import EngineConfig
from pagedserve.services.scheduler.config import PREEMPTION_MODES, SchedulerConfig
from pagedserve.services.scheduler.service import SchedulerServiceConfig

CORE = SchedulerConfig(max_model_len=1)  # the one field without a default


@pytest.mark.parametrize("command", ["generate", "executor", "scheduler", "up"])
def test_every_subcommand_defaults_to_the_scheduler_cores_limits(command: str) -> None:
    args = build_parser().parse_args([command])
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (CORE.max_num_seqs, CORE.max_num_batched_tokens)
    if command != "executor":  # the executor does not schedule
        assert (args.enable_prefix_caching, args.preemption_mode) == (CORE.enable_prefix_caching, CORE.preemption_mode)


def test_the_scheduler_subcommand_defaults_to_the_cores_queue_bound() -> None:
    assert build_parser().parse_args(["scheduler"]).max_num_waiting == CORE.max_num_waiting


@pytest.mark.parametrize("config", [EngineConfig(), SchedulerServiceConfig()], ids=["engine", "scheduler-service"])
def test_the_service_configs_default_to_the_scheduler_cores_settings(config: EngineConfig | SchedulerServiceConfig) -> None:
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_num_waiting", "enable_prefix_caching", "preemption_mode"):
        assert getattr(config, name) == getattr(CORE, name), name


@pytest.mark.parametrize("command", ["generate", "scheduler", "up"])
def test_preemption_mode_offers_the_cores_modes_and_no_other(command: str) -> None:
    parser = build_parser()
    assert [parser.parse_args([command, "--preemption-mode", mode]).preemption_mode for mode in PREEMPTION_MODES] == list(
        PREEMPTION_MODES
    )
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--preemption-mode", "evict"])
