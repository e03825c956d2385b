"""``moco-search info``: a collection's state, read as a user asks for it (real files, SQLite)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import launch
from indexes import Collection, index_images
from indexes.classify import train_collection_probe
from moco import read_encoder_config
from tests.indexes.conftest import interrupted_reembed


def info(coll: Path, capsys: pytest.CaptureFixture, *flags: str) -> str:
    assert launch.main(["info", "--collection", str(coll), *flags]) == 0
    return capsys.readouterr().out


def test_info_says_what_a_collection_holds_and_what_is_wrong(
    images: Path,
    encoder_dir: Path,
    other_encoder_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    shutil.copy(images / "cat" / "000.png", images / "cat" / "copy.png")
    (images / "dog" / "broken.png").write_bytes(b"not a png")
    enc = shutil.copytree(encoder_dir, tmp_path / "enc")
    coll = tmp_path / "c"
    index_images([images], coll, enc, workers=0)
    with Collection.open(coll) as c:
        c.set_user_labels({1: "favourite"})
    train_collection_probe(coll)

    text = info(coll, capsys)
    assert "images: 16 indexed, 1 exact copy, 1 error; 3 labels, 1 image labelled" in text
    assert f"folder: {images} (16 images)\n" in text
    h = read_encoder_config(enc).content_hash[:16]
    assert f"encoder: {enc} (resnet18, 512-d avg, 32 px, hash {h})\n" in text
    assert "index: Flat, 16 vectors" in text and "recall@10 1.0" in text
    assert "(18 added)" in text
    assert "probe default: 4 classes" in text and "fits this encoder" in text
    assert "unfinished" not in text and "not found" not in text

    interrupted_reembed(images, coll, other_encoder_dir)  # a re-embedding left half done
    moved = images.rename(tmp_path / "moved")  # the folder and the encoder moved away
    enc.rename(tmp_path / "enc-moved")
    text = info(coll, capsys)
    assert f"folder: {images} (16 images)  (not found: --move-root it if it moved)" in text
    assert "32 px, hash" in text and "(not found: searching by image needs it)" in text
    assert (
        f"unfinished --reembed: 4 of 16 images staged for encoder {other_encoder_dir.resolve()}"
        in text
    )
    data = json.loads(info(coll, capsys, "--json"))
    assert (data["images"], data["copies"], data["errors"], data["ui_labels"]) == (16, 1, 1, 1)
    assert data["folders"] == [{"path": str(images), "images": 16, "present": False}]
    assert data["encoder"]["present"] is False and data["reembed"]["staged"] == 4
    assert data["probes"][0]["current"] is True and data["index"]["factory"] == "Flat"
    assert moved.is_dir()


def test_info_reads_a_read_only_collection_and_writes_nothing(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    coll = tmp_path / "c"
    index_images([images], coll, encoder_dir, workers=0)
    before = {p.name: p.stat().st_mtime_ns for p in coll.iterdir()}
    os.chmod(coll, 0o555)
    try:
        assert "images: 16 indexed" in info(coll, capsys)
    finally:
        os.chmod(coll, 0o755)
    assert {p.name: p.stat().st_mtime_ns for p in coll.iterdir()} == before


def test_info_of_what_is_not_a_collection_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert launch.main(["info", "--collection", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"Not a collection (no manifest.json): {tmp_path}" in err and "Traceback" not in err
