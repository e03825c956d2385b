"""Search filters as parameterised SQL over the ``images`` table, and searching with them.

A filter selects ids in SQLite (using its indexes, never loading all metadata into Python). How
those ids restrict the search depends on how many there are (``filtered_knn``):

- an exact (flat) index takes them as an ``IDSelectorBatch``: exact, and k hits when k match;
- at most ``EXACT_MAX`` ids: their stored vectors are scored exactly (no index needed);
- a filter keeping at least ``POSTFILTER_MIN`` of the collection: post-filter, i.e. search
  without it for ``k / fraction`` (x 1.5) candidates and keep those that pass, which costs the
  same probes as an unfiltered search;
- otherwise, or when post-filtering came up short: prefilter with an ``IDSelectorBatch`` and
  ``nprobe`` times sqrt(1 / fraction) (a rare filter's best matches lie farther from the
  query, in more lists: at 2% and the unfiltered nprobe, recall@10 was 0.87 in the tests),
  doubling it until k pass (at ``nprobe = nlist`` every list is scanned, so k hits come back
  whenever k ids match). Other approximate indexes fall back to exact scoring.

So a search never returns fewer than ``min(k, matching ids)`` hits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from indexes import vectors
from indexes.store import Database

EXACT_MAX = 4096
"""With an approximate index, filters matching at most this many images are scored exactly."""
POSTFILTER_MIN = 0.05
"""Filters keeping at least this fraction of the collection are applied after the search."""
Found = list[tuple[int, float]]
MAX_SIDE = 1 << 20
"""The largest minimum width or height a filter takes (past any photo's; SQLite's integers
end at 2**63)."""


@dataclass(frozen=True)
class Filters:
    """Restrictions on hits; None means no restriction. ``path_glob`` matches the relative path
    with SQLite GLOB syntax (case-sensitive, ``*`` also crosses ``/``); dates are Unix times of
    the file's mtime."""

    label: str | None = None
    path_glob: str | None = None
    min_width: int | None = None
    min_height: int | None = None
    modified_after: float | None = None
    modified_before: float | None = None

    def __post_init__(self) -> None:
        for side in ("width", "height"):  # SQLite's integers end at 2**63: a traceback past it
            least = getattr(self, f"min_{side}")
            if least is not None and not 0 <= least <= MAX_SIDE:
                raise ValueError(
                    f"the minimum {side} must be from 0 to {MAX_SIDE:,} pixels, got {least}"
                )

    def is_empty(self) -> bool:
        return all(v is None for v in vars(self).values())


def where(filters: Filters | None) -> tuple[str, list[Any]]:
    """A WHERE clause (for ``images``) selecting indexed images that pass ``filters``."""
    clauses, params = ["images.status = 'ok'"], []
    f = filters or Filters()
    for value, clause in (
        (f.label, "images.label = ?"),
        (f.path_glob, "images.relpath GLOB ?"),
        (f.min_width, "images.width >= ?"),
        (f.min_height, "images.height >= ?"),
        (f.modified_after, "images.mtime > ?"),
        (f.modified_before, "images.mtime < ?"),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def allowed_ids(db: Database, filters: Filters | None) -> np.ndarray | None:
    """Sorted ids passing ``filters``, or None when there is nothing to filter on."""
    if filters is None or filters.is_empty():
        return None
    sql, params = where(filters)
    rows = db.execute(f"SELECT id FROM images WHERE {sql} ORDER BY id", params)
    return np.fromiter((r[0] for r in rows), dtype=np.int64)


def filtered_knn(
    index: faiss.Index,
    query: np.ndarray,
    k: int,
    params: dict[str, Any],
    allowed: np.ndarray | None,
    fetch: vectors.FetchVectors,
    exact: bool,
) -> Found:
    """The top ``k`` (id, score) of one query (1 x D) among the ``allowed`` ids (sorted)."""
    if allowed is None:
        return vectors.knn(index, query, k, params, fetch=fetch)[0]
    k = min(k, len(allowed))
    if k == 0:
        return []
    if exact:
        return vectors.knn(index, query, k, params, allowed)[0]
    if len(allowed) <= EXACT_MAX:
        return exact_top(query, allowed, fetch, k)
    if len(allowed) >= POSTFILTER_MIN * index.ntotal:
        found = postfilter(index, query, k, params, allowed, fetch)
        if len(found) >= k:
            return found
    return prefilter(index, query, k, params, allowed, fetch)


def exact_top(query: np.ndarray, ids: np.ndarray, fetch: vectors.FetchVectors, k: int) -> Found:
    """Exact top ``k`` of ``ids`` by their stored vectors, 65,536 at a time."""
    best_i, best_s = np.zeros(0, np.int64), np.zeros(0, np.float32)
    for start in range(0, len(ids), 65536):
        part = ids[start : start + 65536]
        best_i = np.concatenate([best_i, part])
        best_s = np.concatenate([best_s, fetch(part) @ query[0]])
        top = np.argsort(-best_s, kind="stable")[:k]
        best_i, best_s = best_i[top], best_s[top]
    return [(int(i), float(s)) for i, s in zip(best_i, best_s, strict=True)]


def postfilter(
    index: faiss.Index,
    query: np.ndarray,
    k: int,
    params: dict[str, Any],
    allowed: np.ndarray,
    fetch: vectors.FetchVectors,
) -> Found:
    """Search unfiltered for enough candidates that about k pass, keep those (re-ranked)."""
    depth = max(1, int(params.get("rerank", 0)))
    share = len(allowed) / index.ntotal
    want = min(index.ntotal, math.ceil(1.5 * k * depth / share))
    plain = {n: v for n, v in params.items() if n != "rerank"}
    found = vectors.knn(index, query, want, plain)[0]
    cand = np.array([i for i, _ in found], dtype=np.int64)
    pos = np.minimum(np.searchsorted(allowed, cand), len(allowed) - 1)
    keep = [f for f, ok in zip(found, allowed[pos] == cand, strict=True) if ok][: k * depth]
    if depth > 1 and keep:
        return vectors.rerank(query, [keep], fetch, k)[0]
    return keep[:k]


def prefilter(
    index: faiss.Index,
    query: np.ndarray,
    k: int,
    params: dict[str, Any],
    allowed: np.ndarray,
    fetch: vectors.FetchVectors,
) -> Found:
    """FAISS restricted to ``allowed``, probing more lists until ``k`` hits are found."""
    if not vectors.is_ivf(index):
        found = vectors.knn(index, query, k, params, allowed, fetch)[0]
        return found if len(found) >= k else exact_top(query, allowed, fetch, k)
    nlist = faiss.extract_index_ivf(index).nlist
    p = dict(params)
    boost = math.ceil((index.ntotal / len(allowed)) ** 0.5)  # matches lie farther: probe more
    p["nprobe"] = min(nlist, int(p.get("nprobe", 1)) * boost)
    while True:
        found = vectors.knn(index, query, k, p, allowed, fetch)[0]
        if len(found) >= k or p["nprobe"] >= nlist:
            return found
        p["nprobe"] = min(nlist, 2 * p["nprobe"])
