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


def test_an_out_that_is_a_file_is_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--out`` naming a file: said at once, not "[Errno 17] File exists" after the work."""
    from PIL import Image

    from tests.conftest import make_encoder

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 90, 200 - 40 * i)).save(data / f"{i}.png")
    enc = make_encoder(tmp_path / "enc")
    for argv, said in [
        (["export", str(enc), "--out", str(a_file)], "give a folder"),
        (["pretrain", str(data), "--out", str(a_file)], "give a folder for the run"),
        (["ablate", str(data), "--out", str(a_file), "--epochs", "1"], "give a folder"),
    ]:
        assert launch.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--out {a_file} is a file: {said}"), err
    assert a_file.read_text() == "mine"
    assert launch.main(["export", str(enc), "--out", str(a_file / "sub")]) == 2
    assert "cannot make this folder (Not a directory)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["search", "--collection", "c", "q.png", "--min-score", "nan"],
        ["duplicates", "--collection", "c", "--threshold", "nan"],
        ["pretrain", "d", "--out", "o", "--minutes", "inf"],
        ["eval", "--encoder", "e", "--train", "t", "--val", "v", "--t", "NaN"],
        ["probe", "train", "--collection", "c", "--val-fraction=-inf"],
    ],
)
def test_every_float_flag_refuses_nan_and_infinity(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN passes every "must be >= 0" check (it compares false), so each command took it: a
    --minutes nan run trained 200 epochs, --t nan gave a kNN of NaNs, --min-score nan an empty
    search. The flags' own parser refuses it, before anything is read."""
    with pytest.raises(SystemExit) as stop:
        launch.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "must be a finite number, got" in err, err


def test_a_float_flag_that_is_not_a_number_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        launch.main(["pretrain", "d", "--out", "o", "--lr", "1e-3x"])
    assert capsys.readouterr().err.strip().endswith("argument --lr: not a number: '1e-3x'")


def test_an_unknown_flag_of_a_probe_action_is_told_by_that_action(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not by ``probe``'s parser, whose usage line and suggestions know none of its flags."""
    with pytest.raises(SystemExit):
        launch.main(["probe", "train", "--collection", "c", "--fold", "3"])
    err = capsys.readouterr().err
    assert err.startswith("usage: moco-search probe train ")
    assert err.strip().endswith("unrecognized arguments: --fold 3 (did you mean '--folds'?)")
