"""The CLI's security surface: `pagedserve keys DIR`, `--zmq-curve-keys` on every service
(and passed through by `pagedserve up`), and ZeroMQ and HTTP bound to loopback unless
told otherwise."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from pagedserve.services.cli import build_parser, main
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.config import ExecutorConfig
from pagedserve.services.gateway.config import GatewayConfig, gateway_config_from_args
from pagedserve.services.launcher import pagedserve_command, service_commands
from pagedserve.services.scheduler.service import SchedulerServiceConfig
from pagedserve.shared.zmq_security import curve_client, curve_server


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return int(exit_.value.code or 0)


def test_keys_writes_both_keypairs_and_keeps_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert run_cli(["keys", str(keys)]) == 0
    assert sorted(p.name for p in keys.iterdir()) == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    assert curve_client(keys).server_key == curve_server(keys).public_key
    first = curve_server(keys)
    assert run_cli(["keys", str(keys)]) == 0
    assert "kept them" in capsys.readouterr().out
    assert curve_server(keys) == first
    assert run_cli(["keys", str(keys), "--force"]) == 0
    assert curve_server(keys) != first


def test_keys_refuses_half_a_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["keys", str(tmp_path)]) == 0
    (tmp_path / "server.key_secret").unlink()
    assert run_cli(["keys", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("pagedserve keys: error:") and "--force" in error and "Traceback" not in error


def test_every_service_takes_curve_keys(tmp_path: Path) -> None:
    parser = build_parser()
    for argv in (["scheduler"], ["executor"], ["gateway"], ["up"]):
        assert parser.parse_args([*argv, "--zmq-curve-keys", str(tmp_path)]).curve_keys_dir == str(tmp_path)
    gateway = gateway_config_from_args(parser.parse_args(["gateway", "--zmq-curve-keys", str(tmp_path)]))
    assert gateway.curve_keys_dir == str(tmp_path)


def test_up_passes_curve_keys_to_every_service(tmp_path: Path) -> None:
    args = build_parser().parse_args(["up", "--redis-url", "redis://127.0.0.1:6379/0", "--zmq-curve-keys", str(tmp_path)])
    commands = service_commands(args)
    prefix = len(pagedserve_command())
    for command in (commands.scheduler, commands.executor, commands.gateway):
        assert build_parser().parse_args(command[prefix:]).curve_keys_dir == str(tmp_path)
    plain = service_commands(build_parser().parse_args(["up", "--redis-url", "redis://127.0.0.1:6379/0"]))
    assert all("--zmq-curve-keys" not in command for command in (plain.scheduler, plain.executor, plain.gateway))


def test_everything_binds_to_loopback_by_default() -> None:
    parser = build_parser()
    scheduler = parser.parse_args(["scheduler"])
    assert urlparse(scheduler.gateway_address).hostname == "127.0.0.1"
    assert urlparse(scheduler.executor_address).hostname == "127.0.0.1"
    assert urlparse(SchedulerServiceConfig().gateway_address).hostname == "127.0.0.1"
    assert urlparse(SchedulerServiceConfig().executor_address).hostname == "127.0.0.1"
    assert urlparse(ExecutorConfig(EngineConfig()).scheduler_address).hostname == "127.0.0.1"
    gateway = gateway_config_from_args(parser.parse_args(["gateway"]))
    assert gateway.host == "127.0.0.1" and urlparse(gateway.scheduler_address).hostname == "127.0.0.1"
    assert GatewayConfig().host == "127.0.0.1"
    assert parser.parse_args(["up"]).host == "127.0.0.1"
