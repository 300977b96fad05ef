"""Every `pagedserve up` flag reaches the process that uses it: `up`'s flags, each set to a
value other than its default, are turned into each child's argv by the launcher
(`service_commands`), parsed back by that child's own parser, and the child's config must
equal the one `up`'s flags describe, field by field; only what the launcher assigns (ports,
ids, ranks) differs. A flag added to `up` later is covered with no edit here."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import pytest

from pagedserve.services.cli import build_parser, subcommand_parser
from pagedserve.services.config_flags import config_from_args
from pagedserve.services.executor.config import ExecutorConfig
from pagedserve.services.gateway.config import ADMIN_KEY_ENV, API_KEY_ENV, GatewayConfig, gateway_config_from_args
from pagedserve.services.launcher import pagedserve_command, service_commands, service_env
from pagedserve.services.scheduler.service import SchedulerServiceConfig

# Fields each child gets from the launcher, not from `up`'s flags.
ASSIGNED = {
    "scheduler": {"gateway_address", "executor_address", "replica_id"},
    "executor": {"scheduler_address", "executor_id", "rank", "dist_init_address"},
    "gateway": {"scheduler_address", "gateway_id"},
}
UP_ONLY = {"replicas"}  # `up`'s own: how many children it starts


def _other_value(action: argparse.Action) -> list[str]:
    """Argv that sets `action` to something other than its default."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if not action.default else f"--no-{flag[2:]}"]
    if action.choices:
        return [flag, next(str(c) for c in action.choices if c != action.default)]
    if action.type is int:
        return [flag, str((action.default or 0) + 3)]
    if action.type is float:
        return [flag, str((action.default or 0.5) * 2 + 0.25)]
    return [flag, f"set-{action.dest}"]


def _up_argv() -> list[str]:
    argv = ["up"]
    for action in subcommand_parser("up")._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            argv += _other_value(action)
    return argv


def _leaves(config: msgspec.Struct) -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for name in config.__struct_fields__:
        value = getattr(config, name)
        leaves.update(_leaves(value) if isinstance(value, msgspec.Struct) else {name: value})
    return leaves


@pytest.fixture()
def up_args(monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    for name in (API_KEY_ENV, ADMIN_KEY_ENV, "REDIS_URL", "WORLD_SIZE", "RANK", "PAGEDSERVE_DIST_INIT_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(_up_argv())
    defaults = build_parser().parse_args(["up"])
    unchanged = [dest for dest, value in vars(args).items() if value == getattr(defaults, dest) and dest not in ("command", "handler")]
    assert not unchanged, f"the test could not move these flags off their defaults: {unchanged}"
    return args


def test_every_up_flag_reaches_the_process_that_uses_it(up_args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = service_commands(up_args)
    for name, value in service_env(up_args, {}).items():  # the keys travel by environment
        monkeypatch.setenv(name, value)
    prefix = len(pagedserve_command())
    children: dict[str, list[msgspec.Struct]] = {
        "scheduler": [config_from_args(SchedulerServiceConfig, build_parser().parse_args(c[prefix:])) for c in commands.schedulers],
        "executor": [config_from_args(ExecutorConfig, build_parser().parse_args(c[prefix:])) for c in commands.executors],
        "gateway": [gateway_config_from_args(build_parser().parse_args(commands.gateway[prefix:]))],
    }
    expected: dict[str, msgspec.Struct] = {
        "scheduler": config_from_args(SchedulerServiceConfig, up_args),
        "executor": config_from_args(ExecutorConfig, up_args),
        "gateway": config_from_args(GatewayConfig, up_args, api_key=up_args.api_key, admin_key=up_args.admin_key),
    }
    assert len(children["scheduler"]) == up_args.replicas
    assert len(children["executor"]) == up_args.replicas * up_args.tensor_parallel_size
    reached: set[str] = set()
    for kind, configs in children.items():
        want = {k: v for k, v in _leaves(expected[kind]).items() if k not in ASSIGNED[kind]}
        for config in configs:
            got = {k: v for k, v in _leaves(config).items() if k not in ASSIGNED[kind]}
            assert got == want, f"{kind}: " + ", ".join(f"{k}={got[k]!r} (up: {want[k]!r})" for k in want if got[k] != want[k])
        reached |= set(want)
    up_dests = {a.dest for a in subcommand_parser("up")._actions if a.option_strings and a.dest != "help"}
    assert up_dests - UP_ONLY <= reached, f"`up` flags no child config has: {sorted(up_dests - UP_ONLY - reached)}"


def test_the_children_find_each_other(up_args: argparse.Namespace) -> None:
    commands = service_commands(up_args)
    prefix = len(pagedserve_command())
    schedulers = [build_parser().parse_args(c[prefix:]) for c in commands.schedulers]
    executors = [build_parser().parse_args(c[prefix:]) for c in commands.executors]
    gateway = build_parser().parse_args(commands.gateway[prefix:])
    size = up_args.tensor_parallel_size
    assert gateway.scheduler_address.split(",") == [s.gateway_address for s in schedulers]
    for index, scheduler in enumerate(schedulers):
        group = executors[index * size : (index + 1) * size]
        assert {e.scheduler_address for e in group} == {scheduler.executor_address}
        assert [e.rank for e in group] == list(range(size))
    assert not any(up_args.api_key in part or up_args.admin_key in part for c in commands.services().values() for part in c)
