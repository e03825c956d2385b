"""The ``moco-search`` command: pretrain, export, eval, index, search, duplicates, probe, app.

With no subcommand (``python launch.py``) it opens the web UI. Each package declares its own
subcommands in ``<package>/cli.py`` (flags -> a config -> one library call), so this file only
routes; heavy imports (torch, gradio) happen inside the commands, keeping ``--help`` instant.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from app import cli as app_cli
from indexes import cli as indexes_cli
from indexes import probe_cli
from moco import cli as moco_cli

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
    FloatingPointError,
)
"""Raised for bad input (paths, flags, files); shown as one line, never as a traceback."""


GLOBAL_FLAGS = ("-v", "--verbose")


def version() -> str:
    try:
        from importlib.metadata import version as installed

        return installed("moco-search")
    except Exception:  # run from a checkout that was never installed
        return "unknown (not installed)"


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'search'?)`` for a near miss, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse with whole flags only (``--epoch`` is not silently ``--epochs``) and a
    "did you mean" for a mistyped flag; every subcommand's parser is one of these."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def unrecognized(self, extra: list[str]) -> NoReturn:
        flags = [o for o in self._option_string_actions if o.startswith("--")]
        hints = "".join(suggest(a.split("=")[0], flags) for a in extra if a.startswith("--"))
        self.error(f"unrecognized arguments: {' '.join(extra)}{hints}")


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The ``moco-search`` parser and its subcommands' parsers by name."""
    parser = Parser(
        prog="moco-search",
        description="Image search you train yourself: MoCo pretraining, FAISS indexing, web UI. "
        "With no command: the web UI (moco-search app).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    parser.add_argument("--version", action="version", version=f"moco-search {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in (moco_cli, indexes_cli, probe_cli, app_cli):
        module.add_commands(sub)
    return parser, dict(sub.choices)


def route(argv: list[str], commands: Iterable[str]) -> list[str]:
    """``argv`` with ``app`` put in front when it names no command (the web UI is the default).

    A first word that is not a command is a mistake (``serch``), not a request for the UI.
    """
    rest = [a for a in argv if a not in GLOBAL_FLAGS]
    if not rest or (rest[0].startswith("-") and rest[0] not in ("-h", "--help", "--version")):
        return ["app", *argv]
    if not rest[0].startswith("-") and rest[0] not in commands:
        raise SystemExit(f"moco-search: error: unknown command {rest[0]!r}"
                         f"{suggest(rest[0], commands)}; see moco-search --help")
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    try:
        argv = route(argv, commands)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's own parser, with its own flags to suggest
        commands[args.command].unrecognized(extra)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("faiss.loader", "httpx", "matplotlib"):  # their INFO lines are not for users
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        print(f"moco-search {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moco-search {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
