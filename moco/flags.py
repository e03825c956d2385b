"""Command-line flags generated from a config dataclass: one flag per field, so each default
lives once, in the dataclass, and the CLI cannot drift from the library (``--moco-k`` is
``TrainConfig.moco_k``, ``--port`` is ``ServerConfig.port``)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _flag_type(tp: Any) -> tuple[Any, bool]:
    """(type, many): ``int | None`` gives (int, False), ``tuple[Path, ...]`` (Path, True)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return (args[0] if args else str), True
    if len(args) == 1:
        return _flag_type(args[0])
    return (args[0] if args else tp), False


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    helps: dict[str, str],
    positional: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    metavars: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``cls`` (``helps`` by field name); every help names its default,
    once: a help that explains its own default keeps it, others get ``(default: X)``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, many = _flag_type(hints[f.name])
        default = f.default
        if default is dataclasses.MISSING:  # a required field: positional, or given elsewhere
            no_factory = f.default_factory is dataclasses.MISSING
            default = None if no_factory else f.default_factory()
        text = helps.get(f.name, f.name.replace("_", " "))
        if "(default:" not in text:
            shown = (
                {None: "none", (): "none", False: "off", True: "on"}.get(default, default)
                if isinstance(default, (bool, tuple, type(None)))
                else default
            )
            text += f" (default: {shown})"
        if f.name in positional:
            parser.add_argument(f.name, metavar=f.name.upper(), help=helps.get(f.name, f.name))
            continue
        flag = f"--{f.name.replace('_', '-')}"
        extra: dict[str, Any] = (
            {"metavar": (metavars or {}).get(f.name)} if (metavars and f.name in metavars) else {}
        )
        if tp is bool:
            parser.add_argument(
                flag, dest=f.name, default=default, help=text, action=argparse.BooleanOptionalAction
            )
        elif many:
            parser.add_argument(
                flag, dest=f.name, type=tp, nargs="+", default=default, help=text, **extra
            )
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=default, help=text, **extra)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of ``cls`` from the parsed flags (lists become the fields' tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {
        k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names
    }
    return cls(**values)
