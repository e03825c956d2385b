"""One index run at a time: a second run on a collection being indexed is refused, unchanged."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

import launch
from indexes import index_images
from indexes.runlock import LOCK_NAME, CollectionBusy
from tests.conftest import hold as hold_lock
from tests.indexes.test_faults import error_line, files, index_cli


def hold(coll: Path) -> subprocess.Popen:
    return hold_lock(coll / LOCK_NAME)


def test_second_run_is_refused_and_changes_nothing(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    coll = tmp_path / "coll"
    index_images([images / "cat"], coll, encoder_dir, workers=0)
    holder = hold(coll)
    before = files(coll)
    try:
        assert index_cli(images / "dog", coll) == 2
        line = error_line(capsys, "index")
        assert line == (
            f"moco-search index: error: Collection {coll} is being indexed by another process "
            f"(pid {holder.pid}); nothing was changed. Run this again when that run has finished"
        )
        assert files(coll) == before
    finally:
        holder.kill()  # as kill -9 would: the kernel drops the lock with its process
        holder.wait()
    assert index_cli(images / "dog", coll) == 0  # no stale lock to clear by hand
    assert "images in the collection" in capsys.readouterr().out
    assert launch.main(["search", "--collection", str(coll), "--id", "1"]) == 0


def test_a_refused_run_leaves_the_holders_lock_file_alone(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """A new collection's first run holds the lock while it loads the encoder, the lock file
    then all its folder holds. A second run, refused, removed that file on its way out, and a
    third created a new one beside it and ran alongside the first."""
    coll = tmp_path / "coll"
    coll.mkdir()
    holder = hold(coll)
    try:
        for _ in range(2):
            with pytest.raises(CollectionBusy, match=f"pid {holder.pid}"):
                index_images([images], coll, encoder_dir, workers=0)
            assert [p.name for p in coll.iterdir()] == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_released_after_a_run_and_after_a_failed_one(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """The lock goes with the run, whether it ended well or not, in the same process."""
    coll = tmp_path / "coll"
    index_images([images / "cat"], coll, encoder_dir, workers=0)
    with pytest.raises(ValueError, match="Unknown vector dtype"):
        index_images([images / "dog"], coll, vector_dtype="float8", workers=0)
    r = index_images([images / "dog"], coll, workers=0)
    assert r.added > 0
    holder = hold(coll)  # nobody holds it now: another process can take it
    holder.send_signal(signal.SIGTERM)
    holder.wait()


def test_searching_needs_no_lock(images: Path, encoder_dir: Path, tmp_path: Path) -> None:
    coll = tmp_path / "coll"
    index_images([images], coll, encoder_dir, workers=0)
    holder = hold(coll)
    try:
        assert launch.main(["search", "--collection", str(coll), "--id", "1", "-k", "2"]) == 0
    finally:
        holder.kill()
        holder.wait()
