"""``moco-search app`` through ``launch.main``: ready-and-exit mode, flags, safety warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

import launch
from app.server import exposure_warning, parse_auth


@pytest.mark.slow
def test_app_ready_and_exit(collection_dir: Path, port: int,
                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = launch.main(["app", "--collection", str(collection_dir), "--port", str(port),
                      "--ready-and-exit"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ready at http://127.0.0.1:" in out and "returned 5 results" in out


@pytest.mark.slow
def test_no_subcommand_opens_the_app_with_auth(collection_dir: Path, port: int,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = launch.main(["--collection", str(collection_dir), "--port", str(port),
                      "--auth", "ann:s3cret:x", "--ready-and-exit"])
    assert rc == 0
    assert "ready at" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["app", "--auth", "nopassword"],
                                  ["app", "--collection", "/nonexistent/collection"],
                                  ["app", "--port", "70000"]])
def test_user_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main([*argv, "--ready-and-exit"]) == 2
    assert "error" in capsys.readouterr().err


def test_help_gives_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        launch.main(["app", "--help"])
    out = capsys.readouterr().out
    for flag in ("--collection", "--host", "--port", "--auth", "--share", "--ready-and-exit"):
        assert flag in out
    assert "127.0.0.1" in out and "7860" in out


def test_auth_and_exposure() -> None:
    assert parse_auth("u:p:q") == ("u", "p:q")
    assert parse_auth(None) is None
    with pytest.raises(ValueError):
        parse_auth(":p")
    assert exposure_warning("127.0.0.1", None, False) is None
    assert "without --auth" in (exposure_warning("0.0.0.0", None, False) or "")
    assert exposure_warning("0.0.0.0", "u:p", False) is None
    assert "gradio.live" in (exposure_warning("127.0.0.1", None, True) or "")
