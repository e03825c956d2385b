"""The ``moco-search`` command line itself: instant help, and a reference that stays true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import launch

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "pretrain",
    "export",
    "eval",
    "index",
    "search",
    "duplicates",
    "export-embeddings",
    "probe",
    "app",
]


def test_help_and_argument_errors_import_neither_torch_nor_gradio() -> None:
    """``--help`` and a wrong flag are answered before torch (seconds) would have loaded."""
    code = (
        "import sys, launch\n"
        f"for argv in [['--help'], *[[c, '--help'] for c in {COMMANDS!r}],"
        " ['search', '--collection', 'c', '--bogus'], ['index']]:\n"
        "    try:\n"
        "        launch.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'gradio', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:] + out.stderr[-2000:]


def test_docs_cli_md_is_every_commands_help() -> None:
    """Every command and flag is documented, with its default (regenerate: launch.reference)."""
    docs = (ROOT / "docs" / "cli.md").read_text()
    assert docs == launch.reference(), (
        'docs/cli.md is out of date: python -c "import launch; print(launch.reference(), '
        "end='')\" > docs/cli.md"
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_every_optional_flag_says_its_default(name: str) -> None:
    _, commands = launch.build_parser()
    parsers = [commands[name]]
    for action in commands[name]._actions:  # probe's own subcommands
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            parsers += list(choices.values())
    for p in parsers:
        for action in p._actions:
            if action.option_strings and action.dest != "help" and not action.required:
                assert action.help and "default" in action.help, (p.prog, action.dest)
        for action in p._positionals._group_actions:
            if not isinstance(getattr(action, "choices", None), dict):  # not the subcommands
                assert action.help and action.help != action.dest, (p.prog, action.dest)
