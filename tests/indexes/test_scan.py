"""What the scan picks up: the image formats folders hold, and a count of the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import launch
from indexes import Collection
from tests.indexes.conftest import image


def test_ico_is_indexed_and_other_types_are_counted(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image(90).save(images / "cat" / "favicon.ico")
    for name in ("a.psd", "b.psd", "c.PSD"):
        (images / "dog" / name).write_bytes(b"8BPS\x00\x01")
    coll = images / "coll"  # inside its root: its own files are neither indexed nor counted
    args = ["index", str(images), "--collection", str(coll), "--workers", "0"]
    assert launch.main([*args, "--encoder", str(encoder_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("17 images in the collection, 0 exact copies besides (17 new")
    assert out.splitlines()[0].endswith("; 3 files skipped: unsupported type .psd")
    assert out.splitlines()[1].startswith(f"next: moco-search search --collection {coll} ")
    with Collection.open(coll) as c:
        (ico,) = c.query_records("images.relpath = 'cat/favicon.ico'")
        assert ico.status == "ok" and ico.format == "ICO"
        assert c.search(images / "cat" / "favicon.ico", k=1)[0].id == ico.id
    (images / "notes.txt").write_text("not an image\n")
    assert launch.main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("; 4 files skipped: unsupported types .psd (3), .txt (1)")
    last_run = json.loads((coll / "manifest.json").read_text())["last_run"]
    assert last_run["skipped"] == {".psd": 3, ".txt": 1}
