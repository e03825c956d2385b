"""``index --reembed``: a collection moves to another encoder with its ids and labels, and a run
killed at any point leaves it searchable and consistent (real encoders, files, SQLite, FAISS)."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from indexes import Collection, index_images, manifest, switch
from indexes.status import collection_status
from moco import read_encoder_config
from tests.indexes.conftest import consistency, image, interrupted_reembed


def build(images: Path, coll: Path, enc: Path | None, **kw: object):
    return index_images([images], coll, enc, workers=0, batch_size=4, **kw)


def by_path(coll: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Each ok image's id and stored vector, by path."""
    with Collection.open(coll) as c:
        ids, _ = c.labeled()
        return {r.path: (r.id, v) for r, v in zip(c.records(ids), c.vectors(ids), strict=True)}


def encoder_hash(coll: Path) -> str:
    return manifest.read_manifest(coll)["encoder"]["content_hash"]


@pytest.fixture
def coll(images: Path, encoder_dir: Path, tmp_path: Path) -> Path:
    """A collection of ``images`` built with ``encoder_dir``, to re-embed with another."""
    build(images, tmp_path / "c", encoder_dir)
    return tmp_path / "c"


def test_reembed_keeps_ids_and_labels_and_equals_a_fresh_index(
    coll: Path,
    images: Path,
    other_encoder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = by_path(coll)
    some = next(iter(before.values()))[0]
    with Collection.open(coll) as c:
        c.set_user_labels({some: "favourite"})
    with pytest.raises(ValueError, match="--reembed"):  # the refusal names the way out
        build(images, coll, other_encoder_dir)

    stage = switch.stage
    reembed_s = 0.0

    def timed(*a: object, **k: object) -> switch.Staged:
        nonlocal reembed_s
        t = time.perf_counter()
        staged = stage(*a, **k)
        reembed_s = time.perf_counter() - t
        return staged

    monkeypatch.setattr(switch, "stage", timed)
    monkeypatch.setattr(switch, "CHUNK", 6)  # rows read 6 at a time: batches of 4, 2, 4, 2, 4
    report = build(images, coll, other_encoder_dir, reembed=True)

    assert report.reembedded == 16 and report.added == 0
    assert report.seconds > reembed_s  # the summary's time includes the re-embedding
    assert "16 re-embedded with the new encoder" in report.summary()
    assert encoder_hash(coll) == read_encoder_config(other_encoder_dir).content_hash
    after = by_path(coll)
    fresh = build(images, tmp_path / "fresh", other_encoder_dir) and by_path(tmp_path / "fresh")
    assert {p: i for p, (i, _) in after.items()} == {p: i for p, (i, _) in before.items()}
    for path, (_, v) in after.items():
        np.testing.assert_allclose(v, fresh[path][1], atol=1e-5)
        assert np.abs(v - before[path][1]).max() > 1e-3  # really the other encoder's
    assert consistency(coll) == {"ok": 16}
    with Collection.open(coll) as c:
        assert c.user_labels() == {some: "favourite"}
        q = next(iter(after))
        hit = c.search(q, k=1)[0]  # the query is embedded by the new encoder too
        assert hit.path == q and hit.score == pytest.approx(1.0, abs=1e-4)
    db = sqlite3.connect(coll / "meta.db")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    keys = dict(db.execute("SELECT key, value FROM info").fetchall())
    db.close()
    assert "staged_vectors" not in tables and not keys.keys() & {switch.STAGED, switch.SWITCHED}
    assert keys["encoder_hash"] == encoder_hash(coll)  # what a lost manifest is rebuilt for
    # the staging's pages are given back: the file is about a fresh index's size, not twice it
    assert (coll / "meta.db").stat().st_size <= 1.1 * (
        tmp_path / "fresh" / "meta.db"
    ).stat().st_size


def test_reembed_with_the_same_encoder_changes_nothing(
    coll: Path, images: Path, encoder_dir: Path
) -> None:
    before = by_path(coll)
    report = build(images, coll, encoder_dir, reembed=True)
    assert report.reembedded == 0 and report.unchanged == 16
    for path, (i, v) in by_path(coll).items():
        assert before[path][0] == i and np.array_equal(before[path][1], v)


def test_a_new_collection_with_reembed_is_just_indexed(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    report = build(images, tmp_path / "c", encoder_dir, reembed=True)
    assert (report.added, report.reembedded) == (16, 0)
    with pytest.raises(ValueError, match="--reembed needs the encoder"):
        build(images, tmp_path / "c", None, reembed=True)


def test_interrupted_reembed_searches_the_old_way_then_carries_on(
    coll: Path,
    images: Path,
    encoder_dir: Path,
    other_encoder_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = by_path(coll)

    interrupted_reembed(images, coll, other_encoder_dir, staged=8)
    # still the old collection: its encoder, its vectors, its index, each image finds itself
    assert encoder_hash(coll) == read_encoder_config(encoder_dir).content_hash
    for path, (i, v) in by_path(coll).items():
        assert before[path][0] == i and np.array_equal(before[path][1], v)
    assert consistency(coll) == {"ok": 16}
    with Collection.open(coll) as c:
        q = next(iter(before))
        assert c.search(q, k=1)[0].score == pytest.approx(1.0, abs=1e-4)

    caplog.set_level(logging.INFO)
    seen: list[int] = []
    report = build(
        images, coll, other_encoder_dir, reembed=True, progress=lambda d, t: seen.append(d)
    )
    assert "8 images were re-embedded by an earlier run" in caplog.text
    assert seen[0] == 12  # the first batch of this run comes after the 8 staged ones
    assert report.reembedded == 16
    fresh = build(images, tmp_path / "fresh", other_encoder_dir) and by_path(tmp_path / "fresh")
    for path, (_, v) in by_path(coll).items():
        np.testing.assert_allclose(v, fresh[path][1], atol=1e-5)
    assert consistency(coll) == {"ok": 16}


def test_staging_of_another_encoder_is_discarded(
    coll: Path, images: Path, other_encoder_dir: Path, tmp_path: Path
) -> None:
    third = shutil.copytree(other_encoder_dir, tmp_path / "third")  # same weights, other size
    cfg = (third / "config.json").read_text().replace('"image_size": 32', '"image_size": 40')
    (third / "config.json").write_text(cfg)

    interrupted_reembed(images, coll, other_encoder_dir)
    build(images, coll, third, reembed=True)
    with Collection.open(coll) as c:
        assert c.encoder_config.image_size == 40
        ids, _ = c.labeled()
        np.testing.assert_allclose(
            c.vectors(ids), c.embed([r.path for r in c.records(ids)]), atol=1e-5
        )


def test_killed_between_the_swap_and_the_manifest(
    coll: Path,
    images: Path,
    encoder_dir: Path,
    other_encoder_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vectors are swapped in one transaction, the manifest is replaced after: a process
    killed in between must not leave the old encoder embedding queries for the new vectors."""
    real = manifest.write_manifest

    def killed(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(switch.manifest, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        build(images, coll, other_encoder_dir, reembed=True)
    monkeypatch.setattr(switch.manifest, "write_manifest", real)
    assert encoder_hash(coll) == read_encoder_config(encoder_dir).content_hash  # stale
    db = sqlite3.connect(coll / "meta.db")
    made_by = db.execute("SELECT value FROM info WHERE key = 'encoder_hash'").fetchone()[0]
    db.close()
    assert made_by == read_encoder_config(other_encoder_dir).content_hash  # the vectors' own

    with Collection.open(coll) as c:  # a reader trusts the database's record
        assert (
            c.manifest["encoder"]["content_hash"]
            == read_encoder_config(other_encoder_dir).content_hash
        )
        q = next(images.rglob("*.png"))
        hit = c.search(q, k=1)[0]
        assert hit.path == str(q) and hit.score == pytest.approx(1.0, abs=1e-4)
    report = build(images, coll, None)  # the next run writes the manifest the swap did not
    assert report.unchanged == 16
    assert encoder_hash(coll) == read_encoder_config(other_encoder_dir).content_hash
    assert consistency(coll) == {"ok": 16}


def test_files_that_changed_or_broke_are_indexed_again_as_new(
    images: Path, encoder_dir: Path, other_encoder_dir: Path, tmp_path: Path
) -> None:
    """An image with no new vector leaves with its copies and comes back through the scan."""
    coll = tmp_path / "c"
    cat = images / "cat"
    shutil.copy(cat / "000.png", cat / "copy.png")  # an exact copy of 000
    build(images, coll, encoder_dir)
    before = by_path(coll)
    # 000 changes content (the scan sees it); 001 breaks with its size and mtime kept (it does not)
    image(99).save(cat / "000.png")
    st = (cat / "001.png").stat()
    (cat / "001.png").write_bytes(b"\0" * st.st_size)
    os.utime(cat / "001.png", ns=(st.st_atime_ns, st.st_mtime_ns))

    report = build(images, coll, other_encoder_dir, reembed=True)

    assert (report.reembedded, report.added) == (14, 3)  # 000 and 001 left, with 000's copy
    after = by_path(coll)
    assert str(cat / "001.png") not in after
    db = sqlite3.connect(coll / "meta.db")
    status = dict(db.execute("SELECT relpath, status FROM images"))
    db.close()
    assert status["cat/001.png"] == "error" and status["cat/copy.png"] == "ok"
    with Collection.open(coll) as c:
        new = after[str(cat / "000.png")]
        assert new[0] > max(i for i, _ in before.values())  # indexed again, as a new file
        np.testing.assert_allclose(new[1], c.embed([cat / "000.png"])[0], atol=1e-5)
        assert c.search(cat / "copy.png", k=1)[0].relpath == "cat/copy.png"  # copy still there
    for path, (i, _) in after.items():
        if path not in (str(cat / "000.png"), str(cat / "copy.png")):
            assert before[path][0] == i
    counts = consistency(coll)
    assert counts == {"ok": 16, "error": 1}


def test_an_open_collection_follows_the_switch(
    coll: Path, images: Path, encoder_dir: Path, other_encoder_dir: Path
) -> None:
    """A web UI left open while the command line re-embeds: its next search embeds the query
    with the new encoder (it kept the old one loaded), even one opened with --encoder."""
    q = next(images.rglob("*.png"))
    with Collection.open(coll, encoder=encoder_dir) as c:
        assert c.search(q, k=1)[0].score == pytest.approx(1.0, abs=1e-4)  # model loaded
        build(images, coll, other_encoder_dir, reembed=True)
        hit = c.search(q, k=1)[0]
        assert hit.path == str(q) and hit.score == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(c.embed([q]), c.vectors([hit.id]), atol=1e-5)


def test_reembed_of_a_library_that_moved(
    coll: Path, images: Path, other_encoder_dir: Path, tmp_path: Path
) -> None:
    """--move-root and --reembed in one command: the move is done once, before re-embedding
    (the files are read at their new place), and every id is kept."""
    ids = sorted(i for i, _ in by_path(coll).values())
    moved = images.rename(tmp_path / "moved")
    report = index_images(
        [], coll, other_encoder_dir, workers=0, reembed=True, move_root=(images, moved)
    )
    assert (report.reembedded, report.added, report.removed) == (16, 0, 0)
    after = by_path(coll)
    assert sorted(i for i, _ in after.values()) == ids
    assert all(p.startswith(str(moved)) for p in after)
    assert manifest.read_manifest(coll)["roots"] == [str(moved)]
    assert consistency(coll) == {"ok": 16}


def test_predictions_of_the_old_encoder_are_not_read_after_it(
    images: Path, encoder_dir: Path, other_encoder_dir: Path, tmp_path: Path
) -> None:
    from indexes.classify import classify_all, read_predictions

    coll = tmp_path / "c"
    for i in range(4):  # no folder, no label
        image(200 + i).save(images / f"u{i}.png")
    build(images, coll, encoder_dir)
    assert classify_all(coll, knn=True, knn_k=3).n == 4 and len(read_predictions(coll)) == 4
    with Collection.open(coll) as c:  # open across the switch, as a UI is
        build(images, coll, other_encoder_dir, reembed=True)
        assert read_predictions(c) == {} and c.predictions() == []
        assert classify_all(c, knn=True, knn_k=3).n == 4 and len(read_predictions(c)) == 4


def test_a_reembedding_given_up_is_named_then_discarded(
    coll: Path,
    images: Path,
    encoder_dir: Path,
    other_encoder_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:

    interrupted_reembed(images, coll, other_encoder_dir)
    assert build(images, coll, None).unchanged == 16  # the nightly run goes on, and says so
    assert "holds 4 vectors staged by an unfinished --reembed with encoder" in caplog.text
    assert str(other_encoder_dir.resolve()) in caplog.text
    caplog.clear()
    build(images, coll, encoder_dir, reembed=True)  # with its own encoder: given up
    db = sqlite3.connect(coll / "meta.db")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    keys = {r[0] for r in db.execute("SELECT key FROM info")}
    db.close()
    assert "staged_vectors" not in tables and switch.STAGED not in keys
    build(images, coll, None)
    assert "unfinished" not in caplog.text
    assert encoder_hash(coll) == read_encoder_config(encoder_dir).content_hash


def test_a_manifest_from_before_the_reembed_is_refused(
    coll: Path, images: Path, other_encoder_dir: Path
) -> None:
    """``manifest.json`` restored from a backup taken before a ``--reembed`` names the old
    encoder over the new vectors: queries were embedded by the wrong encoder (in silence when
    the sizes agree) and a run would have mixed the two encoders' vectors."""
    old = (coll / "manifest.json").read_bytes()
    build(images, coll, other_encoder_dir, reembed=True)
    (coll / "manifest.json").write_bytes(old)
    db_before = (coll / "meta.db").read_bytes()
    with pytest.raises(ValueError, match="one of the two restored from an older backup"):
        Collection.open(coll)
    with pytest.raises(ValueError, match="restore both from the same backup"):
        build(images, coll, None)
    assert (coll / "meta.db").read_bytes() == db_before and (
        coll / "manifest.json"
    ).read_bytes() == old


def test_a_reader_that_races_the_swap_reads_the_manifest_again(
    coll: Path, images: Path, other_encoder_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap commits the new vectors and their encoder record, then replaces the manifest:
    a reader that read the old manifest just before the replacement, and the database just
    after, sees the two disagree. It reads the manifest again instead of refusing a sound
    collection (the web UI would have failed that search; ``info`` that call)."""
    old = (coll / "manifest.json").read_bytes()
    build(images, coll, other_encoder_dir, reembed=True)
    new = (coll / "manifest.json").read_bytes()
    (coll / "manifest.json").write_bytes(old)  # the moment before the swap's manifest write
    real = manifest.read_manifest
    reads: list[str] = []

    def racing(path: Path) -> dict:
        m = real(path)
        reads.append(m["encoder"]["content_hash"])
        if len(reads) == 1:  # the swap writes its manifest while this reader holds the old one
            tmp = coll / "manifest.tmp"
            tmp.write_bytes(new)
            os.replace(tmp, coll / "manifest.json")
        return m

    monkeypatch.setattr(manifest, "read_manifest", racing)
    with Collection.open(coll) as c:
        assert c.manifest["encoder"]["content_hash"] == encoder_hash(coll) != reads[0]
        q = next(images.rglob("*.png"))
        assert c.search(q, k=1)[0].path == str(q)
    assert reads[1] != reads[0]
    reads.clear()
    (coll / "manifest.json").write_bytes(old)
    st = collection_status(coll)
    assert st.encoder["content_hash"] == encoder_hash(coll) != reads[0]
