"""Collection: filters in SQL, several positives/negatives, ids, labels, paths, reload."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from indexes import Collection, Filters, index_images
from indexes.build import start_run
from moco import CheckpointError
from tests.indexes.conftest import image, write_images


@pytest.fixture
def coll(images: Path, encoder_dir: Path, tmp_path: Path) -> Path:
    image(77, size=(96, 80)).save(images / "owl" / "big.png")
    os.utime(images / "cat" / "000.png", (1_000_000, 1_000_000))
    index_images([images], tmp_path / "c", encoder_dir, workers=0)
    return tmp_path / "c"


def test_filters_match_sql_reference(coll: Path, images: Path) -> None:
    cases = [
        (Filters(label="dog"), lambda r: r.label == "dog"),
        (Filters(path_glob="owl/*"), lambda r: r.relpath.startswith("owl/")),
        (Filters(min_width=90), lambda r: r.width >= 90),
        (Filters(min_height=81), lambda r: False),
        (Filters(modified_before=2_000_000), lambda r: r.relpath == "cat/000.png"),
        (
            Filters(modified_after=2_000_000, label="cat"),
            lambda r: r.label == "cat" and r.relpath != "cat/000.png",
        ),
    ]
    with Collection.open(coll) as c:
        everything = c.records(c.labeled()[0])
        for f, keep in cases:
            want = {r.id for r in everything if keep(r)}
            hits = c.search(images / "cat" / "001.png", k=100, filters=f)
            assert {h.id for h in hits} == want, f
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)


def test_filter_is_parameterised(coll: Path, images: Path) -> None:
    with Collection.open(coll) as c:
        assert c.search(images / "cat" / "001.png", filters=Filters(label="x' OR 1=1 --")) == []


def test_min_score_and_k(coll: Path, images: Path) -> None:
    with Collection.open(coll) as c:
        hits = c.search(images / "dog" / "001.png", k=5)
        assert len(hits) == 5
        cut = hits[2].score
        assert [h.id for h in c.search(images / "dog" / "001.png", k=5, min_score=cut)] == [
            h.id for h in hits[:3]
        ]
        with pytest.raises(ValueError, match="k must be"):
            c.search(images / "dog" / "001.png", k=0)


def test_a_query_file_that_cannot_be_read_is_named(coll: Path, images: Path) -> None:
    from moco import ImageError

    typo = images / "dog" / "001.pgn"
    with Collection.open(coll) as c, pytest.raises(ImageError) as missing:
        c.search(typo, k=3)
    assert missing.value.reason == "missing file" and str(missing.value).endswith(str(typo))
    with Collection.open(coll) as c, pytest.raises(ImageError) as folder:
        c.search(images / "dog", k=3)
    assert folder.value.reason == "not a file" and str(images / "dog") in str(folder.value)


def test_positives_and_negatives(coll: Path, images: Path) -> None:
    with Collection.open(coll) as c:
        ids, _ = c.labeled()
        vecs = c.vectors(ids)
        a, b, n = (
            images / "cat" / "001.png",
            images / "dog" / "003.png",
            images / "owl" / "002.png",
        )
        va, vb, vn = c.embed([a, b, n])
        q = (va + vb) / 2 - 0.5 * vn
        q /= np.linalg.norm(q)
        order = ids[np.argsort(-(vecs @ q), kind="stable")]
        hits = c.search([a, b], k=6, negatives=[n])
        assert [h.id for h in hits] == order[:6].tolist()
        by_id = c.search([int(ids[0]), int(ids[1])], k=3)
        np.testing.assert_allclose(
            c.query_vector([int(ids[0]), int(ids[1])]),
            c.query_vector([vecs[0], vecs[1]]),
            atol=1e-6,
        )
        assert len(by_id) == 3
        with pytest.raises(ValueError, match="cancel"):
            c.query_vector([a], [a], negative_weight=1.0)


def test_search_id_records_labels_vectors(coll: Path) -> None:
    with Collection.open(coll) as c:
        ids, labels = c.labeled()
        assert len(ids) == len(c) == 17 and labels.count("owl") == 5
        assert c.label_counts() == {"cat": 6, "dog": 6, "owl": 5}
        hits = c.search_id(int(ids[4]), k=4)
        assert hits[0].id == ids[4] and len(hits) == 4
        assert c.search_id(int(ids[4]), k=20, filters=Filters(label="dog"))[0].label == "dog"
        recs = c.records([ids[3], ids[1]])
        assert [r.id for r in recs] == [ids[3], ids[1]]
        assert c.vectors([ids[2]]).shape == (1, 512)
        with pytest.raises(KeyError):
            c.records([10_000])
        assert c.encoder_config.image_size == 32 and c.manifest["counts"] == {"ok": 17}


def test_counts_are_queried_again_only_when_the_database_changed(coll: Path) -> None:
    """A page load of the web UI asks for the size and the label counts five times, each a scan
    of every row (60 ms each at 300k images): they are kept until the database changes, and
    an index run's commit (another connection) shows at once, with the manifest unchanged."""
    with Collection.open(coll) as c:
        queries: list[str] = []
        c._db.conn.set_trace_callback(queries.append)
        for _ in range(3):
            assert len(c) == 17 and c.label_counts() == {"cat": 6, "dog": 6, "owl": 5}
        assert sum("count(*)" in q for q in queries) == 2
        other = sqlite3.connect(coll / "meta.db")
        other.execute("UPDATE images SET label = 'bird' WHERE label = 'owl'")
        other.commit()
        assert c.label_counts() == {"bird": 5, "cat": 6, "dog": 6}
        other.execute("DELETE FROM vectors WHERE id = (SELECT min(id) FROM vectors)")
        other.commit()
        assert len(c) == 16 and sum("count(*)" in q for q in queries) == 4
        other.close()


def test_resolve_path_stays_inside_roots(coll: Path, images: Path) -> None:
    with Collection.open(coll) as c:
        i = int(c.labeled()[0][0])
        assert c.resolve_path(i) == images.resolve() / "cat" / "000.png"
    db = sqlite3.connect(coll / "meta.db")
    with db:
        db.execute("UPDATE images SET relpath_raw = ? WHERE id = ?", [b"../../etc/passwd", i])
    db.close()
    with Collection.open(coll) as c, pytest.raises(ValueError, match="outside"):
        c.resolve_path(i)


def test_concurrent_searches_and_reload(coll: Path, images: Path) -> None:
    with Collection.open(coll) as c:
        ids = c.labeled()[0]
        want = {int(i): c.search_id(int(i), k=3)[0].id for i in ids}
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for i in ids:
                    assert c.search_id(int(i), k=3)[0].id == want[int(i)]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        write_images(images, {"new": 2}, start_seed=300)
        index_images([images], coll, None, workers=0)
        assert len(c) == 19  # rows are read live; the index after reload
        c.reload()
        assert c.search(images / "new" / "001.png", k=1)[0].relpath == "new/001.png"


def test_an_open_collection_follows_index_runs_without_reload(
    coll: Path, images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A UI server holds its collection open while ``moco-search index`` changes it. After a run
    that removed files, its first search raised ``KeyError: Unknown image ids`` (the loaded index
    still held them), and new images never showed until a restart."""
    with Collection.open(coll) as c:
        assert any(h.label == "dog" for h in c.search(images / "cat" / "001.png", k=16))
        write_images(images, {"new": 2}, start_seed=300)
        index_images([images], coll, None, workers=0)  # as another process: no reload here
        assert c.search(images / "new" / "001.png", k=1)[0].relpath == "new/001.png"
        for f in (images / "dog").iterdir():
            f.unlink()
        index_images([images], coll, None, workers=0)
        hits = c.search(images / "cat" / "001.png", k=16)
        assert len(hits) == 13 and not any(h.label == "dog" for h in hits)
        assert {h.label for g in c.duplicates(threshold=0.01) for h in g} <= {"cat", "owl", "new"}

        # A run in progress: it has deleted the owls' rows, not yet rewritten the manifest.
        for f in (images / "owl").iterdir():
            f.unlink()
        run = start_run([], coll, None, None)
        run.db.conn.close()
        caplog.clear()
        caplog.set_level(logging.INFO)
        hits = c.search(images / "cat" / "001.png", k=16)
        assert len(hits) == 8 and {h.label for h in hits} == {"cat", "new"}
        (said,) = [r for r in caplog.records if "behind its database" in r.getMessage()]
        assert said.levelno == logging.INFO and "an index run is in progress" in said.getMessage()


def test_loading_the_encoder_holds_up_no_read_and_a_reembed_meanwhile_wins(
    coll: Path, images: Path, other_encoder_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The web UI loads the encoder in the background (``warm``) while it serves its page: the
    page's reads of the database must not wait for torch, and an encoder that a re-embed
    replaced while it loaded must not be the one that embeds queries afterwards."""
    from indexes import embed

    loading, release = threading.Event(), threading.Event()
    real, calls = embed.load_model, []

    def held_first(path: Path, device: str) -> tuple:
        calls.append(path)
        if len(calls) == 1:  # the background load: held until the test lets it go
            loading.set()
            assert release.wait(60)
        return real(path, device)

    monkeypatch.setattr(embed, "load_model", held_first)
    with Collection.open(coll) as c:
        first = int(c.labeled()[0][0])
        warm = threading.Thread(target=c.warm, daemon=True)
        warm.start()
        assert loading.wait(60)
        read: list[object] = []  # read in a thread of its own: a blocked read fails, not hangs
        reader = threading.Thread(
            target=lambda: read.extend([len(c), c.search_id(first, k=1)[0].id]), daemon=True
        )
        reader.start()
        reader.join(20)
        assert read == [17, first], "a read waited for the encoder to load"

        index_images([images], coll, other_encoder_dir, workers=0, reembed=True)
        c.follow_index_runs()  # sees the new encoder while the old one is still loading
        release.set()
        warm.join(60)
        query = images / "cat" / "001.png"
        with Collection.open(coll) as fresh:
            assert np.allclose(c.embed([query]), fresh.embed([query]), atol=1e-5)
        assert len(calls) == 4  # old (dropped), the re-embed's, new, the fresh collection's


def test_an_encoder_that_cannot_load_is_said_when_warmed_and_by_the_search(
    coll: Path, images: Path, encoder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``warm`` runs in the web UI's background thread: a corrupt encoder must be logged there
    (the server's start), not raised into nowhere, and said again by the search that needs it."""
    corrupt = tmp_path / "enc"
    shutil.copytree(encoder_dir, corrupt)
    weights = corrupt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64
    weights.write_bytes(bytes(data))
    with Collection.open(coll, encoder=corrupt) as c:
        caplog.set_level(logging.WARNING)
        c.warm()
        (said,) = [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()]
        assert "do not match the hash in its config" in said, said
        with pytest.raises(CheckpointError, match="do not match the hash in its config"):
            c.embed([images / "cat" / "001.png"])


def test_a_missing_collection_and_a_folder_that_is_not_one_are_told_apart(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Collection not found: .*typo\.coll"):
        Collection.open(tmp_path / "typo.coll")
    with pytest.raises(FileNotFoundError, match=r"Not a collection \(no manifest.json\)"):
        Collection.open(tmp_path)
