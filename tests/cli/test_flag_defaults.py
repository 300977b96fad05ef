"""Defaults defined once: the scheduling limits of every subcommand and of every config
that embeds them are SchedulingLimits' own (shared/scheduling_limits.py), and
--preemption-mode offers exactly its modes."""

from __future__ import annotations

import msgspec
import pytest

from pagedserve.services.cli import build_parser
from pagedserve.services.config_flags import config_from_args
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.config import ExecutorConfig
from pagedserve.services.scheduler.service import SchedulerServiceConfig
from pagedserve.shared.scheduling_limits import PREEMPTION_MODES, SchedulingLimits

LIMITS = SchedulingLimits()
LIMIT_FIELDS = [field.name for field in msgspec.structs.fields(SchedulingLimits)]


@pytest.mark.parametrize("command", ["generate", "executor", "scheduler", "up"])
def test_every_subcommand_defaults_to_the_limits_defaults(command: str) -> None:
    args = build_parser().parse_args([command])
    assert {name: getattr(args, name) for name in LIMIT_FIELDS} == msgspec.structs.asdict(LIMITS)
    assert config_from_args(SchedulingLimits, args) == LIMITS


def test_the_configs_embed_the_limits_with_their_defaults() -> None:
    assert EngineConfig().limits == SchedulerServiceConfig().limits == ExecutorConfig(EngineConfig()).engine.limits == LIMITS


@pytest.mark.parametrize("command", ["generate", "executor", "scheduler", "up"])
def test_every_limit_has_a_flag_that_sets_it(command: str) -> None:
    """A non-default value for each limit, through its flag, lands in that field."""
    argv = [command, "--max-model-len", "77", "--max-num-seqs", "5", "--max-num-batched-tokens", "33",
            "--max-num-waiting", "9", "--no-enable-prefix-caching", "--preemption-mode", "swap"]
    limits = config_from_args(SchedulingLimits, build_parser().parse_args(argv))
    assert limits == SchedulingLimits(
        max_model_len=77, max_num_seqs=5, max_num_batched_tokens=33, max_num_waiting=9,
        enable_prefix_caching=False, preemption_mode="swap",
    )
    assert all(getattr(limits, name) != getattr(LIMITS, name) for name in LIMIT_FIELDS)


@pytest.mark.parametrize("command", ["generate", "scheduler", "up"])
def test_preemption_mode_offers_the_limits_modes_and_no_other(command: str) -> None:
    parser = build_parser()
    assert [parser.parse_args([command, "--preemption-mode", mode]).preemption_mode for mode in PREEMPTION_MODES] == list(
        PREEMPTION_MODES
    )
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--preemption-mode", "evict"])


def test_limits_below_one_are_refused_with_the_number() -> None:
    with pytest.raises(ValueError, match="max_num_seqs must be at least 1, got 0"):
        SchedulingLimits(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len must be at least 1, got -3"):
        SchedulingLimits(max_model_len=-3)


def test_resolved_caps_the_configured_length_at_the_models() -> None:
    assert SchedulingLimits().resolved(2048).max_model_len == 2048  # None: the model's
    assert SchedulingLimits(max_model_len=100).resolved(2048).max_model_len == 100
    assert SchedulingLimits(max_model_len=9000).resolved(2048).max_model_len == 2048
