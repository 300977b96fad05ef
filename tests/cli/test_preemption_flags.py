"""`--preemption-mode` and `--swap-space` reach the scheduler and the executor, from their
own subcommands and through `pagedserve up`."""

from __future__ import annotations

from pagedserve.services.cli import build_parser
from pagedserve.services.config_flags import config_from_args
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.launcher import service_commands


def test_up_passes_the_preemption_mode_to_the_scheduler_and_the_swap_space_to_the_executor() -> None:
    parser = build_parser()
    up = parser.parse_args(["up", "--preemption-mode", "swap", "--swap-space", "12345", "--redis-url", "redis://x"])
    commands = service_commands(up)
    scheduler = parser.parse_args(commands.scheduler[commands.scheduler.index("scheduler") :])
    executor = parser.parse_args(commands.executor[commands.executor.index("executor") :])
    assert scheduler.preemption_mode == "swap"
    assert config_from_args(EngineConfig, executor).swap_space_bytes == 12345


def test_defaults_recompute_without_a_swap_pool() -> None:
    parser = build_parser()
    assert parser.parse_args(["scheduler"]).preemption_mode == "recompute"
    generate = parser.parse_args(["generate", "hi"])
    assert generate.preemption_mode == "recompute"
    assert config_from_args(EngineConfig, generate).swap_space_bytes == 0
