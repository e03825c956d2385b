"""The SQLite database of a collection: one row per file, and the exact embeddings beside them.

SQLite is the source of truth. A row and its vector are written in the same transaction, so a
process killed at any moment leaves either both or neither; the FAISS index is derived from the
``vectors`` table and can always be rebuilt from it. Ids come from ``AUTOINCREMENT`` so a deleted
id is never reused: a stale FAISS file can then be reconciled by comparing id sets alone.

Vectors are stored as float32, or float16 when asked (``vector_dtype``): half the database, and
at most ~1e-3 off in a cosine, well below what separates neighbours. Each blob's length says its
dtype, so a reader needs no setting and a collection converted half-way still reads.

Paths are stored twice: ``relpath_raw`` holds the exact bytes (``os.fsencode``), so file names that
are not UTF-8 survive, and ``relpath`` a readable text form for display, globbing and CSV.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# sqlite-utils imports pandas when it is installed (Gradio installs it), to map ``pd.Timestamp``
# values, which no collection stores: 0.5 s and 33 MB of every command, ``info`` and ``search
# --id`` included (1.35 s -> 0.8 s here). While it loads, a ``None`` in ``sys.modules`` makes
# ``import pandas`` fail as if pandas were absent (the import system's documented behaviour);
# whoever imports pandas afterwards (Gradio) gets it. Every module here takes ``Database`` from
# this one, so that this import is the first.
_unseen = "pandas" not in sys.modules and "sqlite_utils" not in sys.modules
if _unseen:
    sys.modules["pandas"] = None  # type: ignore[assignment]
try:
    from sqlite_utils import Database
finally:
    if _unseen:
        del sys.modules["pandas"]

log = logging.getLogger(__name__)
DB_NAME = "meta.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS roots (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, path_raw BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    root_id INTEGER NOT NULL REFERENCES roots(id),
    relpath TEXT NOT NULL, relpath_raw BLOB NOT NULL,
    size INTEGER, mtime_ns INTEGER, mtime REAL, sha256 TEXT,
    width INTEGER, height INTEGER, format TEXT, label TEXT,
    status TEXT NOT NULL, reason TEXT, duplicate_of INTEGER, indexed_at REAL NOT NULL,
    UNIQUE (root_id, relpath_raw));
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE INDEX IF NOT EXISTS images_status_label ON images (status, label);
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT);
"""
PREDICTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY, label TEXT NOT NULL, confidence REAL NOT NULL, top5 TEXT NOT NULL,
    method TEXT NOT NULL, encoder_hash TEXT NOT NULL, predicted_at REAL NOT NULL);
"""
USER_LABELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS user_labels (
    id INTEGER PRIMARY KEY, label TEXT NOT NULL, labeled_at REAL NOT NULL);
"""
"""Tables a collection gets on first use, so that collections made before them still open:
``classify-all``'s predictions, and labels given in the web UI (``labeled`` sees both kinds)."""

MMAP_BYTES = 2**31
"""How much of the database a serving connection reads through a memory map (SQLite caps it)."""
ROW_COLUMNS = (
    "images.id, roots.path_raw, images.relpath_raw, images.relpath, images.size, images.mtime, "
    "images.sha256, images.width, images.height, images.format, images.label, images.status, "
    "images.reason, images.duplicate_of, images.indexed_at"
)
FROM = "images JOIN roots ON roots.id = images.root_id"


def display(raw: bytes) -> str:
    """Readable text of a file-system path; bytes that are not UTF-8 become ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]} | {
    9: "\\t",
    10: "\\n",
    13: "\\r",
}


def printable(text: str) -> str:
    """``text`` (a path, a folder's label) for one line of a terminal: bytes that are not UTF-8
    and control characters become ``\\xNN`` (``\\n``, ``\\t``). A file named with a newline
    split a hit across two lines of a table, and one named with an escape sequence could drive
    the terminal that printed it."""
    return os.fsencode(text).decode("utf-8", "backslashreplace").translate(_CONTROL)


def join_raw(root_raw: bytes, relpath_raw: bytes) -> str:
    """The absolute path as a ``str`` that ``open`` accepts, non-UTF-8 bytes included."""
    return os.fsdecode(os.path.join(root_raw, relpath_raw))


@dataclass(frozen=True)
class Record:
    """One file of the collection as the database knows it.

    ``path`` and ``root`` are real paths (``open`` accepts them, non-UTF-8 names included);
    ``relpath`` is the readable form, with undecodable bytes shown as ``\\xNN``.
    """

    id: int
    path: str
    root: str
    relpath: str
    size: int | None
    mtime: float | None
    sha256: str | None
    width: int | None
    height: int | None
    format: str | None
    label: str | None
    status: str
    reason: str | None
    duplicate_of: int | None
    indexed_at: float

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Record:
        id_, root_raw, rel_raw, rel, *rest = row
        return cls(id_, join_raw(root_raw, rel_raw), os.fsdecode(root_raw), rel, *rest)

    def meta(self) -> dict[str, Any]:
        """The metadata a search hit carries."""
        keys = ("size", "mtime", "sha256", "width", "height", "format", "status", "indexed_at")
        return {k: getattr(self, k) for k in keys}


def open_store(
    path: str | os.PathLike, create: bool = True, read_only: bool | None = None
) -> Database:
    """The collection database (created if ``create``); WAL lets searches read during a run.

    ``synchronous=NORMAL`` in WAL mode survives a killed process (not a power cut) and keeps
    batch commits cheap. An existing database is opened read-only when ``read_only``, or by
    default when it or its folder cannot be written (a read-only mount, a copy without write
    permission): see ``connect_read_only``.
    """
    path = Path(path)
    if not create and not path.is_file():
        raise FileNotFoundError(f"Collection database missing: {path}")
    if read_only is None:
        read_only = not create and not (
            os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
        )
    if read_only:
        return Database(connect_read_only(path))
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    if create:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
    return Database(conn)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing, not even the ``-shm`` file WAL mode keeps beside it.

    A plain open of a WAL database in a folder it cannot write fails with "unable to open
    database file": SQLite wants to create ``meta.db-shm``. With no ``-wal`` or ``-shm`` beside
    it (no writer connected, the WAL checkpointed: the state every finished index run leaves),
    ``immutable=1`` reads the main file alone and creates nothing. Otherwise ``mode=ro`` reads
    through the existing ``-shm``, and so sees the ``-wal``'s transactions too.
    """
    uri = path.resolve().as_uri()  # percent-encoded: '?', '#' and non-UTF-8 bytes survive
    wal = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
    ways = ["mode=ro", "mode=ro&immutable=1"]
    if not any(p.exists() for p in wal):
        ways.reverse()
    for params in ways:
        conn = sqlite3.connect(f"{uri}?{params}", uri=True, check_same_thread=False)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            conn.close()
            continue
        if "immutable" in params and wal[0].is_file() and wal[0].stat().st_size:
            log.warning(
                "%s: its -wal cannot be read without a -shm; showing the last checkpoint", path
            )
        conn.execute("PRAGMA busy_timeout=30000")
        return conn
    raise PermissionError(f"Cannot open the collection database {path} even read-only")


@contextmanager
def transaction(db: Database) -> Iterator[None]:
    """One transaction around several writes: all of them are committed, or none.

    ``with db.conn:`` alone is not one: sqlite-utils 4 commits every ``db.execute`` write made
    outside an open transaction, and Python's sqlite3 opens one only at the first write, so a
    full disk between a row and its vector left the row without it. Hence the explicit BEGIN.
    """
    db.conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.conn.rollback()
        raise
    db.conn.commit()


def has_table(db: Database, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", [name]).fetchone() is not None


def replace_predictions(db: Database, rows: Sequence[tuple[Any, ...]]) -> None:
    """Replace the whole ``predictions`` table (id, label, confidence, top5 JSON, method,
    encoder hash, time) in one transaction: readers see the old table or the new one."""
    db.conn.executescript(PREDICTIONS_SCHEMA)
    with transaction(db):
        db.conn.execute("DELETE FROM predictions")
        db.conn.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def read_predictions(db: Database, encoder_hash: str) -> list[tuple[Any, ...]]:
    """(id, label, confidence, top5 JSON, method) of the predicted images still indexed, made
    from the features of encoder ``encoder_hash``: after ``index --reembed`` the old encoder's
    predictions are stale (its probe is refused too) until ``classify-all`` runs again."""
    if not has_table(db, "predictions"):
        return []
    return db.execute(
        "SELECT p.id, p.label, p.confidence, p.top5, p.method FROM predictions p "
        "JOIN images i ON i.id = p.id AND i.status = 'ok' WHERE p.encoder_hash = ? ORDER BY p.id",
        [encoder_hash],
    ).fetchall()


def set_user_labels(db: Database, labels: dict[int, str | None], when: float) -> None:
    """Give images labels in the UI's name (``None`` removes one), in one transaction."""
    db.conn.executescript(USER_LABELS_SCHEMA)
    with transaction(db):
        for i, label in labels.items():
            if label:
                db.conn.execute(
                    "INSERT OR REPLACE INTO user_labels VALUES (?, ?, ?)", [int(i), label, when]
                )
            else:
                db.conn.execute("DELETE FROM user_labels WHERE id = ?", [int(i)])


def user_labels(db: Database) -> dict[int, str]:
    """Labels given in the UI, of images still indexed, by id."""
    if not has_table(db, "user_labels"):
        return {}
    return dict(
        db.execute(
            "SELECT u.id, u.label FROM user_labels u JOIN images i ON i.id = u.id "
            "AND i.status = 'ok' ORDER BY u.id"
        ).fetchall()
    )


ENCODER_HASH = "encoder_hash"
"""Info key: the content hash of the encoder whose vectors the table holds; a collection whose
``manifest.json`` is lost knows which encoder it needs (``preflight.check_manifest_kept``)."""


def read_info(db: Database) -> dict[str, str]:
    return {k: v for k, v in db.execute("SELECT key, value FROM info").fetchall()}


def write_info(db: Database, **values: Any) -> None:
    db.conn.executemany(
        "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
        [(k, str(v)) for k, v in values.items()],
    )


def generation(db: Database) -> int:
    """A counter bumped by every transaction that changes the vectors (FAISS staleness check)."""
    row = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
    return int(row[0]) if row else 0


def bump_generation(db: Database) -> None:
    write_info(db, generation=generation(db) + 1)


def root_id(db: Database, root: str) -> int:
    """The id of the root folder ``root`` (absolute), inserted if new."""
    raw = os.fsencode(root)
    row = db.execute("SELECT id FROM roots WHERE path_raw = ?", [raw]).fetchone()
    if row:
        return int(row[0])
    return int(
        db.execute(
            "INSERT INTO roots (path, path_raw) VALUES (?, ?)", [display(raw), raw]
        ).lastrowid
    )


def roots(db: Database) -> dict[int, str]:
    return {i: os.fsdecode(raw) for i, raw in db.execute("SELECT id, path_raw FROM roots")}


VECTOR_DTYPES = ("float32", "float16")


def to_blob(v: np.ndarray, dtype: str = "float32") -> bytes:
    return np.ascontiguousarray(v, dtype=dtype).tobytes()


def from_blobs(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """N x dim float32 from stored blobs of either dtype (told apart by their length)."""
    sizes = {len(b) for b in blobs}
    if sizes <= {4 * dim}:
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dim)
    if sizes == {2 * dim}:
        return np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(-1, dim).astype(np.float32)
    out = np.empty((len(blobs), dim), dtype=np.float32)
    for row, b in enumerate(blobs):
        out[row] = np.frombuffer(b, dtype=np.float16 if len(b) == 2 * dim else np.float32)
    return out


def vector_dtype(db: Database) -> str:
    """The dtype new vectors are written in (float32 unless the collection chose float16)."""
    row = db.execute("SELECT value FROM info WHERE key = 'vector_dtype'").fetchone()
    return row[0] if row else "float32"


def set_vector_dtype(db: Database, dtype: str, dim: int, chunk: int = 65536) -> int:
    """Write new vectors as ``dtype`` from now on and convert the stored ones; returns how many.

    Each chunk is its own transaction, so a killed conversion leaves a readable mix that the
    next run finishes. SQLite reuses the freed pages; ``VACUUM`` would shrink the file.
    """
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"Unknown vector dtype {dtype!r}; valid: {', '.join(VECTOR_DTYPES)}")
    with transaction(db):
        write_info(db, vector_dtype=dtype)
    size = np.dtype(dtype).itemsize * dim
    done, last = 0, -1
    while True:
        rows = db.execute(
            "SELECT id, v FROM vectors WHERE id > ? ORDER BY id LIMIT ?", [last, chunk]
        ).fetchall()
        if not rows:
            return done
        last = rows[-1][0]
        todo = [(i, b) for i, b in rows if len(b) != size]
        if todo:
            vecs = from_blobs([b for _, b in todo], dim)
            with transaction(db):
                db.conn.executemany(
                    "UPDATE vectors SET v = ? WHERE id = ?",
                    [(to_blob(v, dtype), i) for (i, _), v in zip(todo, vecs, strict=True)],
                )
            done += len(todo)


def get_vectors(db: Database, ids: Sequence[int], dim: int) -> np.ndarray:
    """The stored embeddings of ``ids`` in that order (N x dim); a missing id raises KeyError."""
    ids = [int(i) for i in ids]
    found: dict[int, bytes] = {}
    for chunk in chunks(ids, 900):
        q = f"SELECT id, v FROM vectors WHERE id IN ({','.join('?' * len(chunk))})"
        found.update(db.execute(q, chunk).fetchall())
    missing = [i for i in ids if i not in found]
    if missing:
        raise KeyError(f"No vector for ids {missing[:10]}")
    out = from_blobs([found[i] for i in ids], dim) if ids else np.zeros((0, dim), np.float32)
    return out if out.flags.writeable else out.copy()


def iter_vectors(
    db: Database, dim: int, chunk: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All stored vectors in id order, ``chunk`` at a time: (ids int64, vectors N x dim)."""
    last = -1
    while True:
        rows = db.execute(
            "SELECT id, v FROM vectors WHERE id > ? ORDER BY id LIMIT ?", [last, chunk]
        ).fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        yield ids, from_blobs([r[1] for r in rows], dim)
        last = int(ids[-1])


def vector_ids(db: Database) -> np.ndarray:
    return np.fromiter((r[0] for r in db.execute("SELECT id FROM vectors ORDER BY id")), np.int64)


def get_records(db: Database, ids: Sequence[int]) -> list[Record]:
    """Rows of ``ids`` in that order; unknown ids raise KeyError."""
    ids = [int(i) for i in ids]
    found: dict[int, Record] = {}
    for chunk in chunks(ids, 900):
        q = f"SELECT {ROW_COLUMNS} FROM {FROM} WHERE images.id IN ({','.join('?' * len(chunk))})"
        found.update((r[0], Record.from_row(r)) for r in db.execute(q, chunk))
    missing = [i for i in ids if i not in found]
    if missing:
        raise KeyError(f"Unknown image ids {missing[:10]}")
    return [found[i] for i in ids]


def query_records(db: Database, where: str, params: Sequence[Any] = ()) -> list[Record]:
    q = f"SELECT {ROW_COLUMNS} FROM {FROM} WHERE {where} ORDER BY images.id"
    return [Record.from_row(r) for r in db.execute(q, list(params))]


def delete_rows(db: Database, ids: Iterable[int]) -> None:
    """Delete rows and their vectors; an exact copy left behind inherits the deleted vector.

    Rows with ``status='duplicate'`` have no vector of their own (same bytes, same embedding), so
    when their original goes, the first copy becomes ``ok`` with the original's vector.
    Call inside a transaction.
    """
    for i in ids:
        copies = [
            r[0]
            for r in db.execute("SELECT id FROM images WHERE duplicate_of = ? ORDER BY id", [i])
        ]
        vec = db.execute("SELECT v FROM vectors WHERE id = ?", [i]).fetchone()
        if copies and vec:
            heir, rest = copies[0], copies[1:]
            db.execute("UPDATE images SET status='ok', duplicate_of=NULL WHERE id=?", [heir])
            db.execute("INSERT OR REPLACE INTO vectors (id, v) VALUES (?, ?)", [heir, vec[0]])
            for c in rest:
                db.execute("UPDATE images SET duplicate_of = ? WHERE id = ?", [heir, c])
        db.execute("DELETE FROM vectors WHERE id = ?", [i])
        db.execute("DELETE FROM images WHERE id = ?", [i])


def status_counts(db: Database) -> dict[str, int]:
    return dict(db.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())


def chunks(items: Sequence[int], n: int) -> Iterator[list[int]]:
    for start in range(0, len(items), n):
        yield list(items[start : start + n])
