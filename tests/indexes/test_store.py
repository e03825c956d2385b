"""store.py: byte-exact paths, vectors beside rows, copies inheriting a deleted vector."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

from indexes import Collection, index_images, store
from indexes.manifest import read_manifest

name_bytes = st.binary(min_size=1, max_size=60).filter(
    lambda b: b"\0" not in b and b"/" not in b and b not in (b".", b"..")
)


def memory_db() -> Database:
    db = Database(memory=True)
    db.conn.executescript(store.SCHEMA)
    return db


def insert(
    db: Database,
    rid: int,
    rel: bytes,
    status: str = "ok",
    dup: int | None = None,
    vec: np.ndarray | None = None,
) -> int:
    cur = db.execute(
        "INSERT INTO images (root_id, relpath, relpath_raw, status, duplicate_of, indexed_at) "
        "VALUES (?, ?, ?, ?, ?, 0)",
        [rid, store.display(rel), rel, status, dup],
    )
    if vec is not None:
        db.execute("INSERT INTO vectors (id, v) VALUES (?, ?)", [cur.lastrowid, store.to_blob(vec)])
    return int(cur.lastrowid)


@settings(max_examples=60, deadline=None)
@given(root=name_bytes, parts=st.lists(name_bytes, min_size=1, max_size=3))
def test_any_path_bytes_round_trip(root: bytes, parts: list[bytes]) -> None:
    db = memory_db()
    root_path = os.fsdecode(b"/" + root)
    rel = b"/".join(parts)
    rid = store.root_id(db, root_path)
    assert store.root_id(db, root_path) == rid
    i = insert(db, rid, rel)
    (rec,) = store.get_records(db, [i])
    assert os.fsencode(rec.path) == b"/" + root + b"/" + rel
    assert os.fsencode(rec.root) == b"/" + root
    assert rec.relpath == rel.decode("utf-8", "backslashreplace")
    rec.relpath.encode("utf-8")  # the display form is always valid text


def test_vectors_in_requested_order_and_missing_raise() -> None:
    db = memory_db()
    rid = store.root_id(db, "/r")
    v = np.eye(4, dtype=np.float32)
    ids = [insert(db, rid, f"{k}.png".encode(), vec=v[k]) for k in range(4)]
    np.testing.assert_array_equal(store.get_vectors(db, ids[::-1], 4), v[::-1])
    chunks = list(store.iter_vectors(db, 4, chunk=3))
    assert [c[0].tolist() for c in chunks] == [ids[:3], ids[3:]]
    with pytest.raises(KeyError):
        store.get_vectors(db, [999], 4)


def test_deleting_an_original_promotes_its_copy() -> None:
    db = memory_db()
    rid = store.root_id(db, "/r")
    v = np.ones(4, dtype=np.float32) / 2
    orig = insert(db, rid, b"a.png", vec=v)
    c1 = insert(db, rid, b"b.png", "duplicate", orig)
    c2 = insert(db, rid, b"c.png", "duplicate", orig)
    store.delete_rows(db, [orig])
    recs = store.get_records(db, [c1, c2])
    assert [(r.status, r.duplicate_of) for r in recs] == [("ok", None), ("duplicate", c1)]
    np.testing.assert_array_equal(store.get_vectors(db, [c1], 4)[0], v)
    assert store.vector_ids(db).tolist() == [c1]


def test_ids_are_never_reused() -> None:
    db = memory_db()
    rid = store.root_id(db, "/r")
    a = insert(db, rid, b"a.png")
    store.delete_rows(db, [a])
    assert insert(db, rid, b"a.png") == a + 1  # a stale FAISS id can never name a new image


def test_float16_vectors_halve_the_database_and_search_alike(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    index_images([images], tmp_path / "a", encoder_dir, workers=0)
    index_images([images], tmp_path / "b", encoder_dir, workers=0, vector_dtype="float16")

    def vector_bytes(coll: Path) -> int:
        with sqlite3.connect(coll / "meta.db") as db:
            return db.execute("SELECT sum(length(v)) FROM vectors").fetchone()[0]

    assert vector_bytes(tmp_path / "b") * 2 == vector_bytes(tmp_path / "a") == 16 * 512 * 4
    assert read_manifest(tmp_path / "b")["vector_dtype"] == "float16"
    with Collection.open(tmp_path / "a") as a, Collection.open(tmp_path / "b") as b:
        np.testing.assert_allclose(a.vectors([1, 2]), b.vectors([1, 2]), atol=1e-3)
        for i in (1, 7, 12):
            ha, hb = a.search_id(i, k=5), b.search_id(i, k=5)
            assert [h.id for h in ha] == [h.id for h in hb]
            np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=2e-3)
    index_images([], tmp_path / "a", None, workers=0, vector_dtype="float16")  # convert in place
    assert vector_bytes(tmp_path / "a") == vector_bytes(tmp_path / "b")
    with pytest.raises(ValueError, match="vector dtype"):
        index_images([], tmp_path / "a", None, workers=0, vector_dtype="int8")
