"""services/config_flags.py on a small parser: a config survives the trip to argv and
back, flags at their default are left out, and a setting the child has no flag for is an
error, not a silent drop."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from pagedserve.services.config_flags import config_argv, config_from_args


class Inner(msgspec.Struct, frozen=True):
    size: int = 4
    fast: bool = False


class Outer(msgspec.Struct):
    name: str = "a"
    inner: Inner = msgspec.field(default_factory=Inner)
    ratio: float = 0.5
    secret: str | None = None


def parser(with_ratio: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="child")
    p.add_argument("--name", default="a")
    p.add_argument("--size", "--alias", type=int, default=4)
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False)
    if with_ratio:
        p.add_argument("--the-ratio", dest="ratio", type=float, default=0.5)
    p.add_argument("--secret", default=None)
    return p


def test_round_trip_through_argv() -> None:
    config = Outer(name="b", inner=Inner(size=7, fast=True), ratio=0.1 + 0.2, secret="s")
    argv = config_argv(config, parser())
    assert argv == ["--name", "b", "--size", "7", "--fast", "--the-ratio", str(0.1 + 0.2), "--secret", "s"]
    assert config_from_args(Outer, parser().parse_args(argv)) == config


def test_defaults_and_excluded_fields_stay_off_the_command_line() -> None:
    assert config_argv(Outer(), parser()) == []
    assert config_argv(Outer(secret="s"), parser(), exclude={"secret"}) == []
    assert config_from_args(Outer, parser().parse_args([]), name="given") == Outer(name="given")


def test_a_setting_without_a_flag_is_refused() -> None:
    assert config_argv(Outer(), parser(with_ratio=False)) == []  # at its default: nothing lost
    with pytest.raises(ValueError, match=r"Outer.ratio = 0.25 has no flag in `child`"):
        config_argv(Outer(ratio=0.25), parser(with_ratio=False))


def test_none_against_another_default_is_refused() -> None:
    p = parser()
    p.set_defaults(secret="from-env")
    with pytest.raises(ValueError, match="cannot say None"):
        config_argv(Outer(), p)
