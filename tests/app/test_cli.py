"""``moco-search app`` through ``launch.main``: ready-and-exit mode, flags, safety warnings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import launch
from app.server import exposure_warning, parse_auth


@pytest.mark.slow
def test_app_in_a_fresh_process_serves_before_torch_and_without_pyplot(
    collection_dir: Path, port: int
) -> None:
    """As a user starts it. The page is built without torch (3 to 4 s), which ``warm`` then loads
    with the encoder. The self-check search goes through Gradio's event path, which asks
    matplotlib for its backend; unnamed, that imports pyplot (1.2 s of the first search)."""
    argv = ["app", "--collection", str(collection_dir), "--port", str(port), "--ready-and-exit"]
    code = f"""\
import sys, launch
from app.server import ServerConfig, open_context
from app.ui import build_demo
ctx = open_context(ServerConfig(collection={str(collection_dir)!r}))
build_demo(ctx)
print('torch before warm:', 'torch' in sys.modules)
ctx.collection.warm()
print('encoder after warm:', type(ctx.collection._loaded_encoder()[0]).__name__)
ctx.collection.close()
rc = launch.main({argv!r})
print('pyplot imported:', 'matplotlib.pyplot' in sys.modules)
sys.exit(rc)
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(launch.__file__).parent,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "torch before warm: False" in out and "encoder after warm: " in out, out
    assert "encoder after warm: NoneType" not in out, out
    assert "ready at http://127.0.0.1:" in out and "returned 5 results" in out
    assert "pyplot imported: False" in out, out


@pytest.mark.slow
def test_no_subcommand_opens_the_app_with_auth(
    collection_dir: Path, port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = launch.main(
        [
            "--collection",
            str(collection_dir),
            "--port",
            str(port),
            "--auth",
            "ann:s3cret:x",
            "--ready-and-exit",
        ]
    )
    assert rc == 0
    assert "ready at" in capsys.readouterr().out


@pytest.mark.slow
def test_a_collection_whose_encoder_moved_serves_and_says_how_to_point_at_it(
    tmp_path: Path, encoder_factory: Any, tree: Any, port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from indexes import index_images

    enc = encoder_factory(tmp_path / "enc")
    index_images([tree(tmp_path / "images")], tmp_path / "c", enc, batch_size=8, workers=0)
    moved = enc.rename(tmp_path / "moved")
    argv = ["app", "--collection", str(tmp_path / "c"), "--port", str(port), "--ready-and-exit"]
    assert launch.main(argv) == 2  # its example query embeds an image
    err = capsys.readouterr().err
    missing = f"The encoder of collection {tmp_path / 'c'} is not at {enc} (moved or deleted?)"
    assert f"WARNING: {missing}" in err  # said at the start, before any search
    assert f"moco-search app: error: {missing}" in err  # not Gradio's "upstream ... exception"
    assert f"moco-search index --collection {tmp_path / 'c'} --encoder DIR" in err
    index = ["index", "--collection", str(tmp_path / "c"), "--encoder", str(moved)]
    assert launch.main([*index, "--workers", "0"]) == 0
    assert "0 new, 0 updated, 0 renamed, 0 removed, 24 unchanged" in capsys.readouterr().out
    assert launch.main(argv) == 0


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["app", "--auth", "nopassword"], "--auth must look like user:password"),
        (["app", "--collection", "/nonexistent/collection"], "Collection not found"),
        (["app", "--port", "70000"], "--port must be 1-65535, got 70000"),
        # served a page whose every event waited forever
        (["app", "--concurrency", "0"], "--concurrency must be 1 or more, got 0"),
        # Gradio said: "invalid literal for int() with base 10: ''"
        (["app", "--max-file-size", "10"], "--max-file-size must be a size such as 500kb"),
    ],
)
def test_user_errors_exit_2(argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main([*argv, "--ready-and-exit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moco-search app: error: ") and said in err, err


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


def test_a_port_in_use_is_refused_before_loading(
    collection_dir: Path, port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        rc = launch.main(["app", "--collection", str(collection_dir), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and f"port {port} on 127.0.0.1 is in use" in err and "--port" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "flags,said",
    [
        (["--host", "999.1.1.1"], "--host 999.1.1.1: not an address or a known host name"),
        (["--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
        (["--host", "::1"], "IPv4 addresses and host names only"),
        (["--port", "0"], "--port must be 1-65535, got 0"),
    ],
)
def test_a_host_or_port_the_server_cannot_use_is_refused_with_the_reason(
    collection_dir: Path, flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "port 7860 is in use" for a host name that does not resolve, nor a traceback from
    Gradio (an IPv6 address, port 0)."""
    rc = launch.main(["app", "--collection", str(collection_dir), *flags, "--ready-and-exit"])
    err = capsys.readouterr().err
    assert rc == 2 and said in err and "in use" not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_image_folder_is_not_a_collection(
    collection_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = collection_dir.parent / "images"
    assert launch.main(["app", "--collection", str(images), "--ready-and-exit"]) == 2
    err = capsys.readouterr().err
    assert "is an image folder, not a collection" in err and "moco-search index" in err


@pytest.mark.parametrize(
    "argv,said",
    [
        (["serch", "q.png"], "unknown command 'serch' (did you mean 'search'?)"),
        (
            ["index", "d", "--collection", "c", "--batchsize", "3"],
            "unrecognized arguments: --batchsize 3 (did you mean '--batch-size'?)",
        ),
    ],
)
def test_typos_get_did_you_mean(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        rc = launch.main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    assert rc == 2
    assert said in capsys.readouterr().err


def test_flags_are_never_abbreviated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # --epoch is not taken for --epochs
        launch.main(["pretrain", str(tmp_path), "--out", str(tmp_path / "r"), "--epoch", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --epoch 3 (did you mean '--epochs'?)" in (
        capsys.readouterr().err
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        launch.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("moco-search 0.")
