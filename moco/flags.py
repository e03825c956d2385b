"""Command-line flags generated from a config dataclass: one flag per field, so each default
lives once, in the dataclass, and the CLI cannot drift from the library (``--moco-k`` is
``TrainConfig.moco_k``, ``--port`` is ``ServerConfig.port``)."""

from __future__ import annotations

import argparse
import dataclasses
import math
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


def finite_float(text: str) -> float:
    """Every float flag's parser: NaN compares false with every bound, so "must be >= 0" let
    ``--minutes nan`` through (it trained 200 epochs), and ``--t nan`` gave a kNN of NaNs."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def flag(**options: Any) -> dict[str, Any]:
    """A field's command-line spelling, as ``field(metadata=flag(...))``: ``type`` (a parser such
    as a date reader), ``choices``, ``flags`` (e.g. ``("-k",)``), ``nargs`` (for positionals, and
    for tuple flags: 2 for a pair), ``action`` ("append": the flag may be repeated;
    "store_true": ``--json`` without a ``--no-json``), ``metavar``."""
    return {"cli": options}


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    helps: dict[str, str],
    positional: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    metavars: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``cls`` (``helps`` by field name); every help names its default,
    once: a help that explains its own default keeps it, others get ``(default: X)``.

    A field without a default is a required flag (or a positional, if named in ``positional``);
    ``flag(...)`` metadata on a field refines its spelling.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, many = _flag_type(hints[f.name])
        opts = dict(f.metadata.get("cli", {}))
        tp = opts.pop("type", finite_float if tp is float else tp)
        default = f.default
        required = False
        if default is dataclasses.MISSING:  # a required field: positional, or a required flag
            no_factory = f.default_factory is dataclasses.MISSING
            default = None if no_factory else f.default_factory()
            required = no_factory and f.name not in positional
        text = helps.get(f.name, f.name.replace("_", " "))
        if "(default:" not in text and not required:
            shown = (
                {None: "none", (): "none", False: "off", True: "on"}.get(default, default)
                if isinstance(default, (bool, tuple, type(None)))
                else default
            )
            text += f" (default: {shown})"
        metavar = (metavars or {}).get(f.name, opts.pop("metavar", None))
        extra: dict[str, Any] = {"metavar": metavar} if metavar else {}
        if "choices" in opts:
            extra["choices"] = opts.pop("choices")
        if f.name in positional:
            nargs = opts.pop("nargs", None)
            parser.add_argument(
                f.name,
                help=helps.get(f.name, f.name),
                type=tp,
                **({"nargs": nargs, "default": default} if nargs else {}),
                **({"metavar": metavar or f.name.upper()}),
                **{k: v for k, v in extra.items() if k != "metavar"},
            )
            continue
        flags = opts.pop("flags", (f"--{f.name.replace('_', '-')}",))
        if required:
            extra["required"] = True
        if opts.get("action") == "store_true":  # a switch that is only ever turned on
            parser.add_argument(*flags, dest=f.name, action="store_true", help=text)
        elif tp is bool:
            parser.add_argument(
                *flags,
                dest=f.name,
                default=default,
                help=text,
                action=argparse.BooleanOptionalAction,
            )
        elif opts.get("action") == "append":
            parser.add_argument(
                *flags, dest=f.name, type=tp, action="append", default=[], help=text, **extra
            )
        elif many:
            nargs = opts.pop("nargs", "+")
            parser.add_argument(
                *flags, dest=f.name, type=tp, nargs=nargs, default=default, help=text, **extra
            )
        else:
            parser.add_argument(*flags, dest=f.name, type=tp, default=default, help=text, **extra)


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations that ``argv`` sets on the command line, a flag given at its default
    value included (which comparing the parsed values with the defaults cannot tell)."""
    defaults = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in defaults:
            a.default = argparse.SUPPRESS
        seen, _ = parser.parse_known_args(argv)
    finally:
        for a, d in defaults:
            a.default = d
    return set(vars(seen))


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of ``cls`` from the parsed flags (lists become the fields' tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {
        k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names
    }
    return cls(**values)
