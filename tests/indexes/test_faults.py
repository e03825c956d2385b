"""Faults of the machine and of the command line: each ends in one line, with nothing lost.

Real files, SQLite and FAISS throughout. A read-only collection is a read-only bind mount (root)
or ``chmod`` (anyone else); a full disk is a small tmpfs (root), or ``/dev/full`` behind the
temporary file that FAISS or the manifest writer is about to fill (anyone).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import launch
from indexes import index_images, manifest
from indexes.store import open_store
from tests.indexes.conftest import consistency, write_images

ROOT = os.geteuid() == 0


def error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The one error line of ``command`` on stderr, on a line of its own, after any bar."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"moco-search {command}: ")]
    assert len(lines) == 1, err
    assert err.endswith(lines[0] + "\n"), err
    return lines[0]


def files(coll: Path) -> dict[str, bytes]:
    """Every file of a collection directory and its bytes (what "unchanged" compares)."""
    return {p.name: p.read_bytes() for p in sorted(coll.iterdir()) if p.is_file()}


def index_cli(images: Path, coll: Path, *extra: str) -> int:
    return launch.main(["index", str(images), "--collection", str(coll), "--workers", "0", *extra])


@pytest.fixture
def coll(images: Path, encoder_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "coll"
    index_images([images], out, encoder_dir, workers=0)
    return out


def mount(*args: str) -> None:
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("needs root to mount")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount after the test."""
    points: list[Path] = []
    yield points
    for p in reversed(points):
        subprocess.run(["umount", "-l", str(p)], check=False)


def read_only_view(src: Path, at: Path, mounts: list[Path]) -> Path:
    at.mkdir()
    mount("--bind", str(src), str(at))
    mounts.append(at)
    mount("-o", "remount,bind,ro", str(at))
    return at


# --- read-only collections -----------------------------------------------------------------


def search_and_index(ro: Path, images: Path, capsys: pytest.CaptureFixture) -> str:
    """Search ``ro`` (must work), then train a probe and index (refused); the index refusal."""
    before = files(ro)
    query = str(images / "dog" / "002.png")
    assert launch.main(["search", "--collection", str(ro), query, "-k", "3", "--json"]) == 0
    hits = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(hits) == 3 and hits[0]["path"] == query and hits[0]["score"] > 0.999
    assert launch.main(["probe", "train", "--collection", str(ro)]) == 2
    assert "cannot store a probe; nothing was changed" in error_line(capsys, "probe")
    assert index_cli(images, ro) == 2
    line = error_line(capsys, "index")
    assert files(ro) == before
    return line


@pytest.mark.parametrize("live_wal", [False, True], ids=["checkpointed", "with-wal"])
def test_read_only_mount_is_searchable_and_refuses_indexing(
    coll: Path,
    images: Path,
    tmp_path: Path,
    mounts: list[Path],
    capsys: pytest.CaptureFixture,
    live_wal: bool,
) -> None:
    src = coll
    if live_wal:  # a copy taken while a writer had a WAL open: -wal and -shm come along
        writer = sqlite3.connect(coll / "meta.db")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        with writer:
            writer.execute("INSERT OR REPLACE INTO info VALUES ('note', 'in the wal only')")
        src = tmp_path / "copy"
        shutil.copytree(coll, src)
        writer.close()
        assert (src / "meta.db-wal").is_file() and (src / "meta.db-shm").is_file()
    ro = read_only_view(src, tmp_path / "ro", mounts)
    line = search_and_index(ro, images, capsys)
    assert line == (
        f"moco-search index: error: Collection {ro} is not writable (read-only file system); "
        "nothing was changed. It can still be searched; index into a writable copy to update it"
    )
    if live_wal:  # the reader saw the WAL's transaction through the existing -shm
        db = open_store(ro / "meta.db", create=False)
        assert db.execute("SELECT value FROM info WHERE key = 'note'").fetchone() == (
            "in the wal only",
        )
        db.conn.close()


def test_no_collection_is_created_on_a_read_only_mount(
    images: Path,
    encoder_dir: Path,
    tmp_path: Path,
    mounts: list[Path],
    capsys: pytest.CaptureFixture,
) -> None:
    (tmp_path / "empty").mkdir()
    ro = read_only_view(tmp_path / "empty", tmp_path / "ro", mounts)
    assert index_cli(images, ro / "new", "--encoder", str(encoder_dir)) == 2
    assert error_line(capsys, "index") == (
        f"moco-search index: error: Cannot create collection {ro / 'new'}: {ro} is not "
        "writable (read-only file system)"
    )


@pytest.mark.skipif(ROOT, reason="root ignores permission bits (the mount test covers root)")
def test_chmod_read_only_collection_is_searchable(
    coll: Path, images: Path, capsys: pytest.CaptureFixture
) -> None:
    for f in coll.iterdir():
        f.chmod(0o444)
    coll.chmod(0o555)
    try:
        line = search_and_index(coll, images, capsys)
    finally:
        coll.chmod(0o755)
    assert "is not writable (permission denied)" in line


def test_read_only_open_writes_nothing_beside_the_database(coll: Path) -> None:
    """The read-only path itself, for machines that can neither mount nor drop root."""
    before = files(coll)
    db = open_store(coll / "meta.db", create=False, read_only=True)
    assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 16
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("DELETE FROM vectors")
    db.conn.close()
    assert files(coll) == before


# --- a full disk ---------------------------------------------------------------------------


def fill(disk: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the file system at ``disk``."""
    free = shutil.disk_usage(disk).free - leave
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"\0" * max(0, free))
    finally:
        os.close(fd)


@pytest.mark.parametrize("leave", [0, 128 * 1024], ids=["at-start", "mid-run"])
def test_full_disk_keeps_every_committed_batch(
    encoder_dir: Path,
    tmp_path: Path,
    mounts: list[Path],
    capsys: pytest.CaptureFixture,
    leave: int,
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    mounts.append(disk)
    images, coll = tmp_path / "images", disk / "coll"
    write_images(images, {"a": 4})
    index_images([images], coll, encoder_dir, workers=0)
    kept = files(coll)
    write_images(images, {"b": 40}, start_seed=100)
    fill(disk, leave)
    assert index_cli(images, coll, "--batch-size", "8") == 2
    assert error_line(capsys, "index") == (
        f"moco-search index: error: Disk full while writing collection {coll}: nothing was lost "
        "(the batches committed before are kept, no temporary file is left); free some space "
        "and re-run to carry on"
    )
    assert not list(coll.glob("*.tmp"))
    now = files(coll)
    assert {k: now[k] for k in ("manifest.json", "index.faiss")} == {
        k: kept[k] for k in ("manifest.json", "index.faiss")
    }
    (disk / "filler").unlink()  # (SQLite needs room for its -shm even to read)
    db = sqlite3.connect(coll / "meta.db")  # each batch whole or not at all
    ok = db.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id").fetchall()
    assert ok == db.execute("SELECT id FROM vectors ORDER BY id").fetchall() and len(ok) >= 4
    db.close()
    assert index_cli(images, coll, "--batch-size", "8") == 0
    assert consistency(coll) == {"ok": 44}


def test_reading_and_exporting_on_a_full_or_read_only_disk_say_so_in_a_line(
    coll: Path, tmp_path: Path, mounts: list[Path], capsys: pytest.CaptureFixture
) -> None:
    """A search, a kNN classification on a full disk (SQLite makes its -shm file even to
    read); an export onto a full disk (a memory map of a sparse file died of SIGBUS there) or a
    read-only one: each one line, rc 2, no temporary file left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk))
    mounts.append(disk)
    shutil.copytree(coll, disk / "coll")
    (disk / "out").mkdir()
    fill(disk, 0)
    full = disk / "coll"
    for command in (["search", "--id", "1"], ["probe", "classify-all", "--knn"]):
        assert launch.main([*command, "--collection", str(full)]) == 2, command
        assert error_line(capsys, command[0]).endswith(
            f"error: Disk full at collection {full}: SQLite needs a little free space even to "
            "read it; free some space and re-run (nothing was lost)"
        )
    assert (
        launch.main(["export-embeddings", "--collection", str(coll), "--out", str(disk / "out")])
        == 2
    )
    assert "error: Disk full while writing " in error_line(capsys, "export-embeddings")
    assert not list((disk / "out").iterdir())
    (disk / "filler").unlink()
    assert launch.main(["search", "--id", "1", "--collection", str(full)]) == 0
    capsys.readouterr()
    ro = read_only_view(disk / "out", tmp_path / "ro", mounts)
    assert launch.main(["export-embeddings", "--collection", str(coll), "--out", str(ro)]) == 2
    assert error_line(capsys, "export-embeddings").endswith(
        f"error: Read-only file system: {ro / 'embeddings.npy.tmp'}"
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("name", ["index.faiss", "manifest.json"])
def test_enospc_writing_a_file_leaves_no_temporary_file(
    coll: Path, images: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    """The kernel's ENOSPC, from /dev/full behind the temporary file being written."""
    before = files(coll)
    write_images(images, {"new": 3}, start_seed=50)
    (coll / f"{name}.tmp").symlink_to("/dev/full")
    assert index_cli(images, coll) == 2
    assert "Disk full while writing collection" in error_line(capsys, "index")
    assert not (coll / f"{name}.tmp").exists() and not (coll / f"{name}.tmp").is_symlink()
    assert files(coll)[name] == before[name]
    assert index_cli(images, coll) == 0  # space back: the re-run carries on
    assert consistency(coll) == {"ok": 19}


# --- broken encoders -----------------------------------------------------------------------


def broken_encoder(encoder_dir: Path, out: Path, kind: str) -> Path:
    shutil.copytree(encoder_dir, out)
    if kind == "config-list":
        (out / "config.json").write_text("[]\n")
    else:  # truncated weights, and a config without the hash that would have caught it
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "content_hash": ""}))
        weights = out / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:4096])
    return out


@pytest.mark.parametrize("kind", ["config-list", "truncated-weights"])
def test_broken_encoder_writes_nothing_and_the_right_one_then_works(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    bad = broken_encoder(encoder_dir, tmp_path / "bad", kind)
    coll = tmp_path / "coll"
    assert index_cli(images, coll, "--encoder", str(bad)) == 2
    line = error_line(capsys, "index")
    what = "config" if kind == "config-list" else "weights"
    assert line.startswith(f"moco-search index: error: Unreadable encoder {what} {bad}")
    assert not coll.exists()
    assert index_cli(images, coll, "--encoder", str(encoder_dir)) == 0
    assert consistency(coll) == {"ok": 16}


def test_collection_without_vectors_may_take_another_encoder(
    images: Path, encoder_dir: Path, other_encoder_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    coll = tmp_path / "coll"
    index_images([broken], coll, other_encoder_dir, workers=0)
    assert consistency(coll) == {"error": 1}
    report = index_images([images], coll, encoder_dir, workers=0)
    assert report.total == 16 and consistency(coll) == {"ok": 16, "error": 1}
    bound = json.loads((coll / "manifest.json").read_text())["encoder"]["path"]
    assert bound == str(encoder_dir.resolve())
    with pytest.raises(ValueError, match="Encoder mismatch"):  # now it holds vectors
        index_images([images], coll, other_encoder_dir, workers=0)


# --- arguments checked before any work -----------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("batch-size", "batch size must be at least 1, got 0"),
        ("folder-is-a-file", "Not a folder: {images}/cat/000.png is a file"),
        ("collection-is-a-file", "Collection {coll} is a file, not a folder"),
        ("index-type", "Invalid FAISS factory string 'bogus' (could not parse index string"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    images: Path,
    encoder_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    case: str,
    message: str,
) -> None:
    coll = tmp_path / "coll"
    folder, extra = images, ["--encoder", str(encoder_dir)]
    if case == "batch-size":
        extra += ["--batch-size", "0"]
    elif case == "folder-is-a-file":
        folder = images / "cat" / "000.png"
    elif case == "collection-is-a-file":
        coll.write_text("a file\n")
    else:
        extra += ["--index-type", "bogus"]
    assert index_cli(folder, coll, *extra) == 2
    line = error_line(capsys, "index")
    assert message.format(images=images, coll=coll) in line
    if case == "collection-is-a-file":
        assert coll.read_text() == "a file\n"
    else:
        assert not coll.exists()


# --- the progress bar ----------------------------------------------------------------------


def test_an_interrupted_run_ends_the_bar_line(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """So that "interrupted" (or an error) starts a line of its own, not the bar's end."""

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as interrupted:
        index_images(
            [images], tmp_path / "c", encoder_dir, workers=0, batch_size=4, progress=interrupt
        )
    err = capsys.readouterr().err  # read while the exception lives, as the CLI prints it
    assert "indexing" in err and err.endswith("\n") and interrupted.type is KeyboardInterrupt
    assert consistency_after_rerun(images, tmp_path / "c", encoder_dir) == {"ok": 16}


def consistency_after_rerun(images: Path, coll: Path, encoder_dir: Path) -> dict[str, int]:
    index_images([images], coll, encoder_dir, workers=0)
    return consistency(coll)


def test_a_folder_found_empty_keeps_its_images_unless_allowed(
    coll: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An external drive that is not mounted leaves an empty mount point: the nightly re-scan
    removed every image of it, with the labels given in the UI, and embedded them all again
    under new ids once it was mounted. Now nothing is removed unless ``--allow-empty``."""
    from indexes import Collection

    with Collection.open(coll) as c:
        c.set_user_labels({1: "mine"})
    images.rename(tmp_path / "unmounted")
    images.mkdir()  # the mount point, empty
    before = files(coll)
    assert launch.main(["index", "--collection", str(coll)]) == 2
    assert error_line(capsys, "index") == (
        f"moco-search index: error: {images} holds no image file now, but the collection has 16 "
        "images from it: a drive not mounted, or the folder moved? Nothing was removed. If they "
        "were deleted on purpose, run again with --allow-empty to remove them from the collection"
    )
    assert files(coll) == before
    images.rmdir()
    (tmp_path / "unmounted").rename(images)  # mounted again: nothing to do, the label is kept
    assert index_cli(images, coll) == 0
    assert "(0 new, 0 updated, 0 renamed, 0 removed, 16 unchanged)" in capsys.readouterr().out
    with Collection.open(coll) as c:
        assert c.user_labels() == {1: "mine"}

    shutil.rmtree(images)  # deleted on purpose
    images.mkdir()
    assert launch.main(["index", "--collection", str(coll), "--allow-empty"]) == 0
    assert "0 images in the collection" in capsys.readouterr().out
    assert consistency(coll) == {}


def test_a_lost_manifest_is_written_again_only_for_the_encoder_of_the_vectors(
    images: Path,
    encoder_dir: Path,
    other_encoder_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``manifest.json`` deleted (or not copied with ``meta.db``): indexing with another encoder
    bound the collection to it over the old vectors (another size: every search then failed,
    "could not broadcast input array from shape (512,) into shape (256,)"; the same size would
    mix two encoders in silence). Now only the encoder that made them rebuilds the manifest."""
    from moco import read_encoder_config

    coll = tmp_path / "c"
    assert index_cli(images, coll, "--encoder", str(encoder_dir)) == 0
    capsys.readouterr()
    db = sqlite3.connect(coll / "meta.db")
    ids = {r[0] for r in db.execute("SELECT id FROM vectors")}
    db.close()
    (coll / "manifest.json").unlink()
    before = files(coll)
    assert index_cli(images, coll, "--encoder", str(other_encoder_dir)) == 2
    made_by = read_encoder_config(encoder_dir).content_hash[:16]
    said = error_line(capsys, "index")
    assert f"holds {len(ids)} vectors of encoder {made_by} but no manifest.json" in said
    assert files(coll) == before  # nothing was changed
    assert launch.main(["info", "--collection", str(coll)]) == 2
    assert "index its folders again with the encoder that made it" in error_line(capsys, "info")

    assert index_cli(images, coll, "--encoder", str(encoder_dir)) == 0
    assert "had lost its manifest.json: written again for encoder " + made_by in caplog.text
    db = sqlite3.connect(coll / "meta.db")
    assert {r[0] for r in db.execute("SELECT id FROM vectors")} == ids  # nothing re-embedded
    assert consistency(coll)["ok"] == len(ids)

    # a database from before it named its encoder cannot tell: refused
    (coll / "manifest.json").unlink()
    db.execute("DELETE FROM info WHERE key = 'encoder_hash'")
    db.commit()
    db.close()
    capsys.readouterr()
    assert index_cli(images, coll, "--encoder", str(encoder_dir)) == 2
    assert "vectors of an encoder it does not name" in error_line(capsys, "index")


def test_a_manifest_written_again_keeps_the_folders_not_given(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The manifest rebuilt after a loss named only the folders given in that command: the
    others' images stayed in the database, out of every later re-scan and of ``info``."""
    other = tmp_path / "other"
    write_images(other, {"fox": 4}, start_seed=100)
    coll = tmp_path / "c"
    given = ["index", str(images), str(other), "--collection", str(coll), "--workers", "0"]
    assert launch.main([*given, "--encoder", str(encoder_dir)]) == 0
    both = sorted(manifest.read_manifest(coll)["roots"])
    (coll / "manifest.json").unlink()
    assert index_cli(images, coll, "--encoder", str(encoder_dir)) == 0
    assert (
        sorted(manifest.read_manifest(coll)["roots"]) == both == sorted([str(images), str(other)])
    )
    # with no folder given, the run takes them all from the database; the encoder it needs
    (coll / "manifest.json").unlink()
    capsys.readouterr()
    assert launch.main([*given[:1], *given[3:]]) == 2
    assert "has its database but no manifest.json" in error_line(capsys, "index")
    assert launch.main([*given[:1], *given[3:], "--encoder", str(encoder_dir)]) == 0
    assert sorted(manifest.read_manifest(coll)["roots"]) == both
    capsys.readouterr()
    assert launch.main(["index", "--collection", str(coll), "--workers", "0"]) == 0
    assert "(0 new, 0 updated, 0 renamed, 0 removed, 20 unchanged)" in capsys.readouterr().out


def test_a_lost_database_is_indexed_again_without_the_old_faiss_file(
    images: Path, encoder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``meta.db`` deleted beside a manifest and ``index.faiss``: the new database hands out the
    old ids again, to other images, and the FAISS file (reconciled by ids alone) answered with
    the old images' vectors under them."""
    from indexes import Collection

    coll = tmp_path / "c"
    index_images([images], coll, encoder_dir, workers=0)
    for f in coll.glob("meta.db*"):
        f.unlink()
    write_images(images, {"aaa": 2}, start_seed=500)  # scanned first: every id moves
    index_images([images], coll, None, workers=0)
    assert "has no meta.db (deleted?): every image is indexed again, under new ids" in caplog.text
    with Collection.open(coll) as c:
        for path in sorted(images.rglob("*.png")):
            hit = c.search(path, k=1)[0]
            assert hit.path == str(path) and hit.score == pytest.approx(1.0, abs=1e-4), path
