"""Target options on the command line. Each target declares its options as data
(`itwinai_sync.api.TargetOption`); here they become options of the `sync` command, and the
flags given become each target's own values.

Options belong to the targets that declare them. Two targets may declare one flag (W&B's and
another tracker's `--project`): the command has one option for it, and a value given goes to
the chosen targets (`--to`, else every installed target) that declare it. It is an error when
none of them does, and when several of them declare it differently, that is with another
meaning (two output directories): a flag never silently means one thing to one target and
something else to another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ..api import (
    OptionError,
    TargetOption,
    TargetUnavailable,
    exporter_names,
    load_exporter,
)

#: Declared by target name.
Declared = dict[str, tuple[TargetOption, ...]]

_TYPES: dict[str, click.ParamType] = {
    "text": click.STRING, "int": click.INT, "float": click.FLOAT,
    "dir": click.Path(file_okay=False, path_type=Path),
    "file": click.Path(dir_okay=False, path_type=Path),
}


def declared_options() -> Declared:
    """Each installed target's options. A target whose module cannot be imported offers
    none (it says what it lacks when it is used)."""
    declared: Declared = {}
    for name in exporter_names():
        try:
            declared[name] = tuple(load_exporter(name).cli_options)
        except TargetUnavailable:
            continue
    return declared


def param_type(option: TargetOption) -> click.ParamType:
    return click.Choice(option.choices) if option.choices else _TYPES[option.type]


def _meaning(option: TargetOption) -> TargetOption:
    """What a declaration means to the user (the key is the target's own business)."""
    return dataclasses.replace(option, key="-")


def click_options(declared: Declared, reserved: set[str]) -> list[click.Option]:
    """One click option per flag, whose value is stored in the context (`given_flags`) when
    it is given. A flag the command has itself (`reserved`) is not offered (with a warning):
    a target cannot change what `--run` means."""
    by_flag: dict[str, list[tuple[str, TargetOption]]] = {}
    for target, options in declared.items():
        for option in options:
            if option.flag in reserved:
                click.echo(f"warning: the {target} target declares {option.flag}, an option of "
                           "`sync` itself; it is not offered", err=True)
                continue
            by_flag.setdefault(option.flag, []).append((target, option))
    params = []
    for flag, takers in by_flag.items():
        first = takers[0][1]
        alike = all(_meaning(o) == _meaning(first) for _, o in takers)
        help_text = (first.help if alike
                     else " | ".join(f"{t}: {o.help}" for t, o in takers if not o.hidden))
        params.append(click.Option(
            [flag], type=param_type(first) if alike else click.STRING, default=None,
            metavar=first.metavar if alike else "VALUE", help=help_text,
            hidden=all(o.hidden for _, o in takers), expose_value=False,
            callback=_keep(flag)))
    return params


def _keep(flag: str) -> Any:
    def keep(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            ctx.meta.setdefault("given_flags", {})[flag] = value
    return keep


def options_by_target(declared: Declared, given: dict[str, Any],
                      chosen: Iterable[str] | None) -> dict[str, dict[str, Any]]:
    """Each target's own values of the flags `given` (flag -> value): a flag goes to every
    `chosen` target (None: every installed one) that declares it, as that target's type.
    OptionError when no chosen target declares a given flag, or when those that do declare
    it differently; UnknownTarget / TargetUnavailable for a chosen target that cannot be
    loaded."""
    names = list(declared) if chosen is None else list(chosen)
    for name in names:
        if name not in declared:
            load_exporter(name)  # raises: no such target, or its module cannot be imported
    values: dict[str, dict[str, Any]] = {}
    for flag, value in given.items():
        takers = {t: o for t in names for o in declared[t] if o.flag == flag}
        if not takers:
            owners = sorted(t for t, options in declared.items()
                            if any(o.flag == flag for o in options))
            raise OptionError(f"{flag} is not an option of {', '.join(names)} (it is an option "
                              f"of {', '.join(owners)})")
        first = next(iter(takers.values()))
        if any(_meaning(o) != _meaning(first) for o in takers.values()):
            which = " and ".join(sorted(takers))
            raise OptionError(f"{flag} means different things to {which}: "
                              + ("sync to them separately" if chosen is not None
                                 else "say which target with --to"))
        for target, option in takers.items():
            try:
                typed = param_type(option).convert(value, None, None)
            except click.BadParameter as e:
                raise OptionError(f"{flag} of {target}: {e.message}") from e
            values.setdefault(target, {})[option.key] = typed
    return values
