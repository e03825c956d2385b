"""The ``moco-search`` command: pretrain, export, eval, index, search, duplicates, probe, app.

With no subcommand (``python launch.py``) it opens the web UI. Each package declares its own
subcommands in ``<package>/cli.py`` (flags -> a config -> one library call), so this file only
routes; heavy imports (torch, gradio) happen inside the commands, keeping ``--help`` instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app import cli as app_cli
from indexes import cli as indexes_cli
from indexes import probe_cli
from moco import cli as moco_cli

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    FileExistsError,
    FloatingPointError,
)
"""Raised for bad input (paths, flags, files); shown as one line, never as a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-search",
        description="Image search you train yourself: MoCo pretraining, FAISS indexing, web UI.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (moco_cli, indexes_cli, probe_cli, app_cli):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    first = next((a for a in argv if not a.startswith("-") or a in ("-h", "--help")), None)
    if first is None or (first not in commands and first not in ("-h", "--help")):
        argv = ["app", *argv]  # no subcommand: the web UI
    args = parser.parse_args(argv)
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
