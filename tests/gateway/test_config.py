"""GatewayConfig from flags and environment: the API and admin keys may come from
PAGEDSERVE_API_KEY / PAGEDSERVE_ADMIN_KEY (so they stay out of `ps`), a flag wins over
the environment, and the deadline and body limits map to their fields and are checked."""

from __future__ import annotations

import pytest

from pagedserve.services.cli import build_parser
from pagedserve.services.gateway.config import ADMIN_KEY_ENV, API_KEY_ENV, GatewayConfig, gateway_config_from_args


def config_from(argv: list[str]) -> GatewayConfig:
    return gateway_config_from_args(build_parser().parse_args(["gateway", *argv]))


def test_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "sk-from-env")
    monkeypatch.setenv(ADMIN_KEY_ENV, "admin-from-env")
    config = config_from([])
    assert (config.api_key, config.admin_key) == ("sk-from-env", "admin-from-env")
    config = config_from(["--api-key", "sk-flag", "--admin-key", "admin-flag"])
    assert (config.api_key, config.admin_key) == ("sk-flag", "admin-flag")


def test_no_key_anywhere_or_an_empty_one_means_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setenv(ADMIN_KEY_ENV, "")  # compose's `${PAGEDSERVE_ADMIN_KEY:-}` when unset
    config = config_from([])
    assert config.api_key is None and config.admin_key is None


def test_deadline_and_body_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_from(["--request-timeout", "30", "--body-timeout", "2.5", "--max-body-bytes", "4096", "--max-n", "4"])
    assert (config.request_timeout_s, config.body_timeout_s, config.max_body_bytes, config.max_n) == (30.0, 2.5, 4096, 4)
    defaults = config_from([])
    assert (defaults.request_timeout_s, defaults.body_timeout_s, defaults.max_body_bytes) == (600.0, 30.0, 1 << 20)
    for argv, fragment in [
        (["--request-timeout", "0"], "request_timeout_s"),
        (["--body-timeout", "-1"], "body_timeout_s"),
        (["--max-body-bytes", "10"], "max_body_bytes"),
        (["--max-n", "0"], "max_n"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            config_from(argv)
