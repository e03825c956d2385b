"""kill -9 of a real indexing process, then a re-run: database and FAISS index agree."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexes import Collection, index_images
from tests.indexes.conftest import all_files, consistency, write_images

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from indexes import index_images
index_images([Path(sys.argv[1])], Path(sys.argv[2]), Path(sys.argv[3]), workers=0, batch_size=2)
"""


def rows(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)
        try:
            return con.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def kill_when(images: Path, coll: Path, enc: Path, at_rows: int) -> int:
    """Start an index run and SIGKILL it once ``at_rows`` rows are committed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(images), str(coll), str(enc)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if rows(coll / "meta.db") >= at_rows:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return rows(coll / "meta.db")


@pytest.mark.slow
def test_kill_9_then_rerun_is_consistent(tmp_path: Path, encoder_dir: Path) -> None:
    images = tmp_path / "imgs"
    write_images(images, {"a": 30, "b": 30})
    coll = tmp_path / "c"
    first = kill_when(images, coll, encoder_dir, at_rows=10)
    second = kill_when(images, coll, encoder_dir, at_rows=first + 12)
    assert 10 <= first < second < 60
    report = index_images([images], coll, None, workers=0)
    assert report.added == 60 - second and report.updated == 0
    assert consistency(coll) == {"ok": 60}

    clean = tmp_path / "clean"
    index_images([images], clean, encoder_dir, workers=0)
    with Collection.open(coll) as a, Collection.open(clean) as b:
        ra = {r.relpath: r.id for r in a.records(a.labeled()[0])}
        rb = {r.relpath: r.id for r in b.records(b.labeled()[0])}
        assert ra == rb  # same ids: nothing indexed twice, order kept
        assert {os.fsencode(k) for k in ra} == all_files(images)
        ids = sorted(ra.values())
        np.testing.assert_allclose(a.vectors(ids), b.vectors(ids), atol=1e-4)


@pytest.mark.slow
def test_a_folder_added_by_a_killed_run_is_carried_on_by_a_plain_rerun(
    tmp_path: Path, encoder_dir: Path
) -> None:
    """``index --collection C NEW`` killed while embedding NEW: the re-run without folders (the
    nightly one, or the one the disk-full message asks for) finishes NEW. The manifest named
    only the old folders, so NEW's rows were orphans no run looked at again: searched, never
    updated, their files' deletions never seen."""
    old, new = tmp_path / "old", tmp_path / "new"
    write_images(old, {"a": 4})
    write_images(new, {"b": 40}, start_seed=300)
    coll = tmp_path / "c"
    index_images([old], coll, encoder_dir, workers=0)
    killed = kill_when(new, coll, encoder_dir, at_rows=10)
    assert 10 <= killed < 44
    report = index_images([], coll, None, workers=0)
    assert report.added == 44 - killed and report.unchanged == killed
    assert consistency(coll) == {"ok": 44}
    with Collection.open(coll) as c:
        assert c.manifest["roots"] == sorted([str(old), str(new)])


def test_stale_faiss_file_is_reconciled(tmp_path: Path, encoder_dir: Path, images: Path) -> None:
    """A crash after the rows were committed but before index.faiss was saved."""
    coll = tmp_path / "c"
    index_images([images], coll, encoder_dir, workers=0)
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("index.faiss", "manifest.json"):
        shutil.copy(coll / name, stale / name)
    write_images(images, {"new": 3}, start_seed=500)
    gone = (images / "cat" / "000.png").read_bytes()
    (images / "cat" / "000.png").unlink()
    index_images([images], coll, None, workers=0)
    for name in ("index.faiss", "manifest.json"):  # put back the old index, as after kill -9
        shutil.copy(stale / name, coll / name)
    with Collection.open(coll) as c:  # reconciled in memory on open
        assert len(c) == 18
        hit = c.search(images / "new" / "001.png", k=1)[0]
        assert hit.relpath == "new/001.png"
        assert all(h.relpath != "cat/000.png" for h in c.search(gone))
    index_images([images], coll, None, workers=0)  # and saved by the next run
    assert consistency(coll) == {"ok": 18}


def test_damaged_collection_files(
    tmp_path: Path,
    encoder_dir: Path,
    images: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """A copy cut short: index.faiss is rebuilt from the vectors (the database holds them all);
    a damaged manifest or database is one line that says what to do, not a traceback."""
    import launch

    coll = tmp_path / "c"
    index_images([images], coll, encoder_dir, workers=0)
    whole = (coll / "index.faiss").read_bytes()
    (coll / "index.faiss").write_bytes(whole[:100])
    with Collection.open(coll) as c:  # FAISS raised "read error in index.faiss: 18 != ..."
        assert c.search(images / "dog" / "001.png", k=1)[0].relpath == "dog/001.png"
    assert "index.faiss is damaged; rebuilding the index from the stored vectors" in caplog.text
    index_images([images], coll, None, workers=0)  # nothing changed, yet the file is saved anew
    assert (coll / "index.faiss").stat().st_size == len(whole)
    query = str(images / "dog" / "001.png")
    for name, damage, said in [
        ("manifest.json", b"{bad", "manifest.json is damaged (Expecting property name"),
        ("meta.db", b"not a database" * 20, "meta.db is damaged (file is not a database)"),
    ]:
        kept = (coll / name).read_bytes()
        (coll / name).write_bytes(damage)
        capsys.readouterr()
        assert launch.main(["search", "--collection", str(coll), query]) == 2, name
        err = capsys.readouterr().err.strip()
        assert said in err and err.endswith("or index the folders again into a new collection")
        (coll / name).write_bytes(kept)
