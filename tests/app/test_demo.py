"""``ensure_demo_collection``: built once (index + probe on the train split), then reused."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import launch
from app.demo import cache_dir, demo_example, ensure_demo_collection
from tests.conftest import free_port, hold


def demo_images(root: Path, tree: Any) -> Path:
    tree(root, n=5)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "name", "codepoints", "split"])
        for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
            for i, p in enumerate(sorted((root / label).iterdir())):
                w.writerow([f"{label}/{p.name}", label, p.stem, "", "val" if i == 0 else "train"])
    return root


def test_built_once_then_reused(
    tmp_path: Path, encoder_dir: Path, tree: Any, encoder_factory: Any
) -> None:
    from indexes.probes import list_probes

    images = demo_images(tmp_path / "images", tree)
    seen: list[tuple[int, int]] = []
    coll = ensure_demo_collection(
        tmp_path / "cache",
        encoder=encoder_dir,
        images=images,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert (coll / "manifest.json").is_file() and seen[-1] == (15, 15)
    # indexed with the shipped encoder fitted to the demo images, as export fits a user's
    used = json.loads((coll / "manifest.json").read_text())["encoder"]["config"]
    assert used["fit"]["kind"] == "center" and used["fit"]["images"] == 15
    assert used["pooling"] == "stages" and used["fit"]["folder"] == str(images.resolve())
    probe = list_probes(coll)["default"]
    assert probe["metrics"]["n"] == 3  # the val split only
    assert not (tmp_path / "cache" / "collection.building").exists()
    stamp = (coll / "manifest.json").stat().st_mtime_ns
    assert ensure_demo_collection(tmp_path / "cache", encoder=encoder_dir, images=images) == coll
    assert (coll / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = encoder_factory(tmp_path / "enc2", seed=1)
    ensure_demo_collection(tmp_path / "cache", encoder=other, images=images)
    assert (coll / "manifest.json").stat().st_mtime_ns != stamp  # new encoder: rebuilt
    assert len(list((tmp_path / "cache").glob("encoder-*"))) == 1  # the old fit is gone
    example = demo_example(images)
    row = next(
        r
        for r in (images / "manifest.csv").read_text().split()
        if example and Path(example).name in r
    )
    assert row.endswith(",val")


def test_cache_dir_and_missing_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCO_SEARCH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="Demo encoder"):
        ensure_demo_collection(tmp_path, encoder=tmp_path / "none")


def test_a_cache_that_cannot_be_made_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The first run builds the demo under the cache: a cache under a file (or on a read-only
    disk) said only "[Errno 20] Not a directory" about a folder the user never named."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MOCO_SEARCH_CACHE", str(tmp_path / "file"))
    assert launch.main(["--ready-and-exit", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moco-search app: error: The demo's cache folder ")
    assert err[0].endswith(
        "(Not a directory): set MOCO_SEARCH_CACHE to a folder you can write, or open your own "
        "collection with --collection"
    )


def test_a_second_first_run_waits_for_the_first_ones_build(
    tmp_path: Path, encoder_dir: Path, tree: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Two `python launch.py` at once on a new machine: the second built beside the first,
    removed its files mid-build, and one of them ended in a FAISS traceback."""
    images = demo_images(tmp_path / "images", tree)
    cache = tmp_path / "cache"
    cache.mkdir()
    holder = hold(cache / "build.lock")  # the first run, building
    caplog.set_level("INFO", logger="app.demo")
    built: list[Path] = []
    second = threading.Thread(
        target=lambda: built.append(
            ensure_demo_collection(cache, encoder=encoder_dir, images=images)
        ),
        daemon=True,  # a failed assertion below must not leave pytest waiting on the lock
    )
    try:
        second.start()
        deadline = time.monotonic() + 60
        while "waiting for it" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        said = f"another moco-search (pid {holder.pid}) is building the demo collection"
        assert said in caplog.text
        time.sleep(0.5)
        assert not built and not list(cache.glob("encoder-*"))  # waits: touches nothing
    finally:
        holder.kill()  # the first ends (here as kill -9 would: its lock goes with it)
        holder.wait()
    second.join(timeout=120)
    assert built and (built[0] / "manifest.json").is_file()
