"""Re-embedding a collection with another encoder in place: ids, labels and history kept.

A better encoder (trained longer, on more images) should not cost a collection what it holds:
its ids, the labels given in the web UI, moved folders, the remembered labels CSV. Indexing
into a new collection loses all of that, so ``index --collection C --encoder NEW --reembed``
embeds every indexed image again with NEW and swaps the vectors under the same ids.

Crash safety. New vectors go to a staging table beside the live ones (``staged_vectors``), a
batch per transaction, and ``info.staged_encoder`` names the encoder that made them. Until the
swap the collection searches with its old encoder and old vectors, so a run of hours can be
killed at any moment: the same command carries on from what is staged (an id always names the
same bytes, ``plan``, so a staged vector never goes stale; another encoder's staging is
discarded). The swap is one transaction that replaces the vectors and records the new encoder
in ``info.switched_encoder``; the manifest is replaced right after. A process killed between
the two leaves a manifest naming the old encoder over the new vectors, so readers and the next
run trust the database while the key is there (``adopt_switch``, ``finish_switch``). The FAISS
file is removed before the swap: its ids would still match, and ``sync`` reconciles by ids
alone, so it would have kept serving the old vectors.

An image with no new vector (it cannot be read now, or its bytes are no longer the indexed ones)
leaves the collection at the swap, with its exact copies; the ordinary index run that follows
finds those files again and indexes them as new files, with the new encoder.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from indexes import manifest, store, vectors
from moco import EncoderConfig, file_identity

if TYPE_CHECKING:
    from indexes.embed import Decoded

log = logging.getLogger(__name__)

STAGED_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS staged_vectors (id INTEGER PRIMARY KEY, v BLOB NOT NULL)"
)
STAGED = "staged_encoder"
SWITCHED = "switched_encoder"
CHUNK = 16384
"""Rows read at a time while staging (each chunk starts its decoding workers: ~1 s a minute)."""
READ_ATTEMPTS = 3
"""Reads of a manifest replaced under its reader (``read_adopted``; a swap replaces it once)."""


@dataclass
class Staged:
    """What staging found: ``done`` ids have a new vector; ``failed`` maps the rest to why."""

    done: int = 0
    resumed: int = 0
    """Of ``done``, the vectors an earlier, interrupted run had staged already."""
    failed: dict[int, str] = field(default_factory=dict)


def same_entry(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Whether two manifest encoder entries make the same vectors (hash and config), compared
    as JSON: a tuple in a config read back from the database is a list."""

    def key(e: dict[str, Any]) -> str:
        return json.dumps([e["content_hash"], e["config"]], sort_keys=True)

    return a is not None and key(a) == key(b)


def _info_entry(db: store.Database, key: str) -> dict[str, Any] | None:
    if not store.has_table(db, "info"):
        return None
    raw = store.read_info(db).get(key)
    return json.loads(raw) if raw else None


def unfinished(db: store.Database) -> tuple[dict[str, Any], int] | None:
    """The encoder entry and vector count an interrupted ``--reembed`` left staged, if any."""
    entry = _info_entry(db, STAGED)
    if entry is None or not store.has_table(db, "staged_vectors"):
        return None
    return entry, int(db.execute("SELECT count(*) FROM staged_vectors").fetchone()[0])


def discard(collection: Path) -> int:
    """Drop what an unfinished ``--reembed`` staged (a re-embedding given up); its count."""
    db = store.open_store(collection / store.DB_NAME, create=False)
    try:
        found = unfinished(db)
        if found is None:
            return 0
        with store.transaction(db):
            db.execute("DROP TABLE staged_vectors")
            db.execute("DELETE FROM info WHERE key = ?", [STAGED])
        _compact(db, collection)
        return found[1]
    finally:
        db.conn.close()


def _compact(db: store.Database, collection: Path) -> None:
    """Give the staging's pages back to the file system: the database stayed twice its size."""
    try:
        db.execute("VACUUM")
    except sqlite3.OperationalError as e:  # a full disk (it needs a copy's room), a busy reader
        log.info("%s not compacted (%s); later runs reuse its free pages", collection, e)


def _decoded(
    db: store.Database, ids: list[int], cfg: EncoderConfig, batch_size: int, workers: int
) -> Iterator[tuple[list[store.Record], list[Decoded]]]:
    """Rows and their decoded files, a batch at a time; the rows are read ``CHUNK`` at a time,
    so memory stays bounded (a million ``Record``s were half a gigabyte)."""
    from indexes import embed  # torch: readers of this module's state (``info``) never need it

    for chunk in store.chunks(ids, CHUNK):
        records = store.get_records(db, chunk)
        batches = embed.decode_batches([r.path for r in records], cfg, batch_size, workers)
        for start, decoded in zip(range(0, len(chunk), batch_size), batches, strict=True):
            yield records[start : start + len(decoded)], decoded


def stage(
    db: store.Database,
    entry: dict[str, Any],
    cfg: EncoderConfig,
    model: Any,
    *,
    batch_size: int,
    workers: int,
    device: str,
    progress: Callable[[int, int], None] | None = None,
) -> Staged:
    """Embed every image that has a vector with ``model`` into the staging table.

    Each file's bytes are checked against the hash its row was indexed with: a file changed
    since (or during) the run would otherwise give its old id another image's vector.
    """
    from indexes import embed  # as in ``_decoded``

    with store.transaction(db):
        db.execute(STAGED_SCHEMA)
        if not same_entry(_info_entry(db, STAGED), entry):  # another encoder's: worth nothing now
            db.execute("DELETE FROM staged_vectors")
            store.write_info(db, **{STAGED: json.dumps(entry, sort_keys=True)})
    have = {r[0] for r in db.execute("SELECT id FROM staged_vectors")}
    live = store.vector_ids(db).tolist()
    ids = [i for i in live if i not in have]
    result = Staged(resumed=len(live) - len(ids))
    result.done = result.resumed
    if result.resumed:
        log.info("%d images were re-embedded by an earlier run: carrying on", result.resumed)
    dtype = store.vector_dtype(db)
    total = result.done + len(ids)
    with tqdm(total=total, initial=result.done, unit="img", desc="re-embedding") as bar:
        try:
            for rows, decoded in _decoded(db, ids, cfg, batch_size, workers):
                good = []
                for r, d in zip(rows, decoded, strict=True):
                    if d.tensor is None:
                        result.failed[r.id] = d.reason or "unreadable"
                    elif d.sha256 != r.sha256:
                        result.failed[r.id] = "changed since it was indexed"
                    else:
                        good.append((r.id, d))
                vecs = embed.embed_decoded(model, [d for _, d in good], device)
                with store.transaction(db):
                    db.conn.executemany(
                        "INSERT OR REPLACE INTO staged_vectors (id, v) VALUES (?, ?)",
                        [
                            (i, store.to_blob(v, dtype))
                            for (i, _), v in zip(good, vecs, strict=True)
                        ],
                    )
                result.done += len(good)
                bar.update(len(rows))
                if progress:
                    progress(bar.n, total)
        except KeyboardInterrupt:
            bar.close()
            log.warning(
                "interrupted: the %d of %d images re-embedded so far are kept; the same command "
                "carries on. Until it finishes, the collection searches with its old encoder",
                result.done,
                total,
            )
            raise
    return result


def swap(
    collection: Path,
    db: store.Database,
    old: dict[str, Any],
    entry: dict[str, Any],
    failed: list[int],
) -> dict[str, Any]:
    """Make the staged vectors the collection's, in one transaction; return the new manifest.

    ``failed`` ids (no new vector) leave the collection with their exact copies, whose rows
    point at them. The index entry keeps its type and budget; the file is built again by the
    run that follows (``generation`` None says it is behind).
    """
    (collection / vectors.INDEX_NAME).unlink(missing_ok=True)  # see the module docstring
    with store.transaction(db):
        gone = list(failed)
        for chunk in store.chunks(failed, 900):
            marks = ",".join("?" * len(chunk))
            q = f"SELECT id FROM images WHERE duplicate_of IN ({marks})"
            gone += [r[0] for r in db.execute(q, chunk)]
        store.delete_rows(db, sorted(set(gone), reverse=True))  # copies before originals
        db.execute("DELETE FROM vectors")
        db.execute(
            "INSERT INTO vectors (id, v) SELECT s.id, s.v FROM staged_vectors s "
            "JOIN images i ON i.id = s.id WHERE i.status = 'ok'"
        )
        ok = db.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0]
        have = db.execute("SELECT count(*) FROM vectors").fetchone()[0]
        if ok != have:  # rolled back: the old vectors stay
            raise RuntimeError(f"re-embedding left {ok - have} images without a vector")
        db.execute("DROP TABLE staged_vectors")
        db.execute("DELETE FROM info WHERE key = ?", [STAGED])
        store.write_info(
            db,
            **{
                SWITCHED: json.dumps(entry, sort_keys=True),
                store.ENCODER_HASH: entry["content_hash"],
            },
        )
        store.bump_generation(db)
    m = _switched(old, entry)
    manifest.write_manifest(collection, m)
    with store.transaction(db):
        db.execute("DELETE FROM info WHERE key = ?", [SWITCHED])
    _compact(db, collection)
    return m


def _switched(m: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    return {
        **m,
        "encoder": entry,
        "feature_dim": int(entry["config"]["feature_dim"]),
        "generation": None,
    }


def check_vectors_encoder(m: dict[str, Any], db: store.Database) -> None:
    """Refuse a manifest that names another encoder than the one the database records for its
    vectors: one of the two restored from an older backup (across a ``--reembed``), or from
    another collection. Queries would be embedded by the wrong encoder, in silence when the
    sizes agree, and an index run would mix the two encoders' vectors."""
    made_by = store.read_info(db).get(store.ENCODER_HASH)
    named = m["encoder"]["content_hash"]
    if made_by and made_by != named and db.execute("SELECT 1 FROM vectors LIMIT 1").fetchone():
        raise ValueError(
            f"The collection's {manifest.MANIFEST_NAME} names encoder {named[:16]}, but its "
            f"database holds vectors of encoder {made_by[:16]} (one of the two restored from "
            "an older backup, or from another collection?): restore both from the same backup"
        )


def adopt_switch(m: dict[str, Any], db: store.Database) -> dict[str, Any]:
    """``m``, or, after a swap whose manifest was never written, ``m`` with the new encoder;
    a manifest and database that disagree otherwise are refused (``check_vectors_encoder``)."""
    entry = _info_entry(db, SWITCHED)
    if entry is None:
        check_vectors_encoder(m, db)
        return m
    if same_entry(m["encoder"], entry):
        return m
    log.warning(
        "the manifest still names encoder %s, but the vectors were re-embedded with %s (a "
        "--reembed run stopped before its last step): using %s",
        m["encoder"]["content_hash"][:16],
        entry["content_hash"][:16],
        entry["path"],
    )
    return _switched(m, entry)


def read_adopted(
    collection: Path, db: store.Database
) -> tuple[dict[str, Any], tuple[int, int, int] | None]:
    """The collection's manifest through ``adopt_switch``, and the identity of the file it was
    read from (``file_identity``, taken before reading, for whoever follows later changes).

    A ``--reembed`` swap commits its vectors and encoder record, writes the manifest, then
    deletes ``SWITCHED``: a reader that read the old manifest just before the write and the
    database just after the delete would see the two disagree and refuse a sound collection.
    The manifest is read again when it was replaced during the read; a mismatch that stays is
    real (a restored backup) and is raised."""
    path = collection / manifest.MANIFEST_NAME
    for _ in range(READ_ATTEMPTS - 1):
        seen = file_identity(path)
        try:
            return adopt_switch(manifest.read_manifest(collection), db), seen
        except ValueError:
            if file_identity(path) == seen:
                raise
    seen = file_identity(path)
    return adopt_switch(manifest.read_manifest(collection), db), seen


def finish_switch(collection: Path) -> None:
    """Write the manifest a stopped swap did not (a run calls this first, under its lock)."""
    path = collection / store.DB_NAME
    if not (collection / manifest.MANIFEST_NAME).is_file() or not path.is_file():
        return
    db = store.open_store(path, create=False)
    try:
        if _info_entry(db, SWITCHED) is None:
            return
        m = adopt_switch(manifest.read_manifest(collection), db)
        manifest.write_manifest(collection, m)
        with store.transaction(db):
            db.execute("DELETE FROM info WHERE key = ?", [SWITCHED])
    finally:
        db.conn.close()
