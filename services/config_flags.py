"""Config structs <-> command-line flags, by one rule: a flag's argparse `dest` is the
name of the config field it sets.

Each setting has one owner, its field in a config struct; a subcommand declares the flag
for it once (services/cli.py). With the rule, building a config from parsed flags and
turning a config back into the argv of a child process (`pagedserve up` starting the
services) are both mechanical: nothing keeps a second list of flags that could forget one.
Embedded structs (`EngineConfig.limits`) read their fields from the same flat namespace,
so a field name is one flag across all the structs of one command.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterator
from typing import Any, TypeVar

import msgspec

S = TypeVar("S", bound=msgspec.Struct)


def _struct_type(annotation: Any) -> type[msgspec.Struct] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct) else None


def config_from_args(cls: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """`cls` with each field taken from `args.<field name>` where the command has that
    flag (embedded structs likewise, from the same namespace), else `overrides`, else the
    field's default."""
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        embedded = _struct_type(field.type)
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif embedded is not None:
            values[field.name] = config_from_args(embedded, args)
        elif hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
    return cls(**values)


def config_argv(config: msgspec.Struct, parser: argparse.ArgumentParser, *, exclude: Collection[str] = ()) -> list[str]:
    """The flags that make `parser` rebuild `config` (with `config_from_args`): each field
    whose value is not already the parser's default, spelled as the parser spells it.

    A field the parser has no flag for must hold its struct's default (else the child
    would silently run with another value: ValueError); `exclude` names fields that travel
    otherwise (secrets by environment) or that the child must choose itself."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # the parser's own table; argparse has no public one
        if action.option_strings:
            actions.setdefault(action.dest, action)  # the first spelling (aliases come later)
    argv: list[str] = []
    for owner, field, value in _leaf_fields(config):
        if field.name in exclude:
            continue
        action = actions.get(field.name)
        if action is None:
            if field.default is msgspec.NODEFAULT or value != field.default:
                raise ValueError(
                    f"{type(owner).__name__}.{field.name} = {value!r} has no flag in `{parser.prog}`: "
                    "the child process would not get it"
                )
            continue
        if value == parser.get_default(field.name):
            continue
        if value is None:
            raise ValueError(f"`{parser.prog} {action.option_strings[0]}` cannot say None (its default is {action.default!r})")
        argv += _spell(action, value)
    return argv


def _leaf_fields(config: msgspec.Struct) -> Iterator[tuple[msgspec.Struct, msgspec.structs.FieldInfo, Any]]:
    for field in msgspec.structs.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, msgspec.Struct):
            yield from _leaf_fields(value)
        else:
            yield config, field, value


def _spell(action: argparse.Action, value: Any) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        positive = [s for s in action.option_strings if not s.startswith("--no-")]
        negative = [s for s in action.option_strings if s.startswith("--no-")]
        return [positive[0] if value else negative[0]]
    if action.nargs == 0:  # store_true / store_false
        if bool(value) == bool(action.const):
            return [action.option_strings[0]]
        raise ValueError(f"{action.option_strings[0]} can only set {action.const!r}, not {value!r}")
    return [action.option_strings[0], str(value)]
