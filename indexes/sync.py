"""Keeping the FAISS file in step with the database, which is the source of truth.

The manifest records the database ``generation`` the FAISS file was saved at. Equal generations
mean the file is current. Otherwise (a run killed between committing rows and saving the index)
the index is reconciled by id sets, which is exact because ids are never reused, or rebuilt from
the stored vectors when its type cannot remove ids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexes import budget, store, vectors
from indexes.store import Database

log = logging.getLogger(__name__)


def _fetch(db: Database, dim: int) -> vectors.FetchVectors:
    return lambda ids: store.get_vectors(db, ids, dim)


def build_from_store(db: Database, factory: str, dim: int) -> faiss.Index:
    return vectors.build(
        factory, dim, store.vector_ids(db), _fetch(db, dim), store.iter_vectors(db, dim)
    )


def open_index(
    collection: Path,
    db: Database,
    manifest: dict[str, Any],
    mmap: bool = False,
    running: bool = False,
) -> faiss.Index:
    """The collection's index, matching the database even after a crash (fixed in memory).

    ``running``: the caller saw an index run change the database under an open collection, so
    an index behind it is expected, said at INFO level; on opening it may be a crash's, a warning.
    """
    dim = int(manifest["feature_dim"])
    entry = manifest.get("index", {})
    path = collection / vectors.INDEX_NAME
    current = manifest.get("generation") == store.generation(db)
    index = _load(path, mmap=mmap and current) if path.is_file() else None
    if index is not None:
        if current:
            return index
        log.log(
            logging.INFO if running else logging.WARNING,
            "%s is behind its database%s; reconciling from stored vectors",
            path,
            " (an index run is in progress)" if running else "",
        )
        if vectors.reconcile(index, store.vector_ids(db), _fetch(db, dim)):
            return index
    return build_from_store(db, entry.get("factory", "Flat"), dim)


def _load(path: Path, mmap: bool = False) -> faiss.Index | None:
    """The FAISS file, or None when it cannot be read (damaged, or a copy cut short): the
    database holds every vector, so the index is rebuilt from it, never lost."""
    try:
        return vectors.load(path, mmap=mmap)
    except RuntimeError:  # FAISS: "read error in index.faiss: 18 != 143360"
        log.warning("%s is damaged; rebuilding the index from the stored vectors", path)
        return None


def recall_sample(db: Database, dim: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Member vectors as queries and their exact top-10 ids (the recall reference)."""
    ids = store.vector_ids(db)
    size = min(len(ids), 1000 if len(ids) <= 100_000 else 300) if n else 0
    pick = np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))
    queries = store.get_vectors(db, pick, dim)
    return queries, vectors.exact_knn(queries, store.iter_vectors(db, dim), 10)


def update_index(
    collection: Path,
    db: Database,
    manifest: dict[str, Any],
    index_type: str,
    max_index_memory: int | None = None,
) -> dict[str, Any]:
    """Bring the FAISS file up to date, choosing its type; return the manifest's index entry.

    ``auto`` picks the most accurate type within ``max_index_memory`` bytes (the collection's
    last budget when None, else ``budget.DEFAULT_BUDGET``), so a nightly run keeps the budget a
    collection was given once. The type changes (and the index is rebuilt from the stored
    vectors, nothing re-embedded) when the size or the budget calls for another.
    """
    dim = int(manifest["feature_dim"])
    n = int(db.execute("SELECT count(*) FROM vectors").fetchone()[0])
    old = manifest.get("index", {})
    limit = max_index_memory or old.get("max_index_memory") or budget.DEFAULT_BUDGET
    factory = budget.choose(n, dim, limit).factory if index_type == "auto" else index_type
    path = collection / vectors.INDEX_NAME
    gen = store.generation(db)
    same = old.get("factory") == factory and old.get("max_index_memory") == limit
    # a file of another size than the one saved is damaged (a copy cut short): saved anew
    intact = path.is_file() and path.stat().st_size == old.get("file_bytes", path.stat().st_size)
    if same and intact and manifest.get("generation") == gen:
        return old
    index = None
    if old.get("factory") == factory and path.is_file():
        index = _load(path)
        if index is not None and not vectors.reconcile(
            index, store.vector_ids(db), _fetch(db, dim)
        ):
            index = None
    if index is None:
        log.info("building a %s index over %d vectors", factory, n)
        index = build_from_store(db, factory, dim)
    params: dict[str, Any] = {}
    recall = 1.0
    if n and factory != "Flat":
        queries, truth = recall_sample(db, dim, n)
        depth = budget.rerank_depth(factory)
        params, recall = vectors.tune(index, queries, truth, rerank=depth, fetch=_fetch(db, dim))
    vectors.save(index, path)
    return {
        "type": index_type,
        "factory": factory,
        "params": params,
        "recall_at_10": round(recall, 4),
        "ntotal": int(index.ntotal),
        "file_bytes": path.stat().st_size,
        "max_index_memory": limit,
        "estimated_bytes": budget.estimate(factory, n, dim),
    }
