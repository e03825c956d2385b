"""Exporting a collection for use elsewhere: embeddings as ``.npy`` with ids, metadata as CSV.

Vectors are streamed from SQLite into a memory-mapped ``.npy`` so that a million of them never sit
twice in RAM. Row ``i`` of ``embeddings.npy`` belongs to ``ids.npy[i]`` and to the CSV row with
that id.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexes import store
from indexes.faults import atomic_file
from indexes.manifest import read_manifest
from moco import output_folder

CSV_COLUMNS = (
    "id",
    "path",
    "root",
    "relpath",
    "label",
    "status",
    "reason",
    "duplicate_of",
    "width",
    "height",
    "format",
    "size",
    "mtime",
    "sha256",
    "indexed_at",
)


@dataclass(frozen=True)
class ExportResult:
    embeddings: Path
    ids: Path
    metadata: Path
    count: int


FILE_SUFFIXES = (".npy", ".npz", ".csv", ".json", ".jsonl", ".parquet", ".h5", ".pt", ".pkl")
"""An ``out`` named like one of these files is a mistake: it would become a folder of that name."""


def export_embeddings(collection: str | os.PathLike, out: str | os.PathLike) -> ExportResult:
    """Write ``embeddings.npy`` (N x D float32), ``ids.npy`` (N int64) and ``metadata.csv``
    into the folder ``out``."""
    collection, out = Path(collection), Path(out)
    if out.suffix.lower() in FILE_SUFFIXES and not out.exists():
        raise ValueError(
            f"{out} is named like a file, but the export is a folder (embeddings.npy, ids.npy, "
            f"metadata.csv): give a folder name, such as {out.with_suffix('')}"
        )
    dim = int(read_manifest(collection)["feature_dim"])
    output_folder(out)
    db = store.open_store(collection / store.DB_NAME, create=False)
    try:
        n = int(db.execute("SELECT count(*) FROM vectors").fetchone()[0])
        ids = np.empty(n, dtype=np.int64)
        # Streamed with write(), not into a memory map: a map of the (sparse) file dies of
        # SIGBUS ("Bus error") when the disk fills up, where a write says ENOSPC.
        with atomic_file(out / "embeddings.npy") as tmp, open(tmp, "wb") as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (n, dim)}
            np.lib.format.write_array_header_1_0(f, header)
            pos = 0
            for chunk_ids, vecs in store.iter_vectors(db, dim):
                if pos + len(chunk_ids) > n:
                    break
                f.write(np.ascontiguousarray(vecs, dtype="<f4").tobytes())
                ids[pos : pos + len(chunk_ids)] = chunk_ids
                pos += len(chunk_ids)
            if pos != n:
                raise ValueError(
                    f"collection {collection} changed while it was exported (an index run?): "
                    "run the export again"
                )
        with atomic_file(out / "ids.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, ids)
        _write_csv(db, out / "metadata.csv")
    finally:
        db.conn.close()
    return ExportResult(out / "embeddings.npy", out / "ids.npy", out / "metadata.csv", n)


def _write_csv(db: store.Database, path: Path) -> None:
    """All rows (errors included), paths in readable form; streamed, not loaded at once."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        cur = db.execute(f"SELECT {store.ROW_COLUMNS} FROM {store.FROM} ORDER BY images.id")
        while rows := cur.fetchmany(10_000):
            for row in rows:
                r = store.Record.from_row(row)
                values = {
                    **vars(r),
                    "path": store.display(os.fsencode(r.path)),
                    "root": store.display(os.fsencode(r.root)),
                }
                w.writerow([values[c] for c in CSV_COLUMNS])
