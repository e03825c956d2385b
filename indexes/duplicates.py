"""Near-duplicate groups: every stored vector queried against the index, pairs above a threshold
joined with union-find, plus the exact byte copies the indexer recorded as ``duplicate``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from indexes import store, vectors

if TYPE_CHECKING:
    from indexes.collection import Collection, Hit

NEIGHBOURS = 16
"""Neighbours looked at per image; larger groups are still joined through shared members."""


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def similar_pairs(
    index: faiss.Index, params: dict[str, Any], chunks: Any, threshold: float
) -> list[tuple[int, int]]:
    """(a, b) id pairs with cosine >= ``threshold``, a < b, from kNN of every stored vector."""
    pairs = []
    for ids, vecs in chunks:
        for a, found in zip(
            ids.tolist(), vectors.knn(index, vecs, NEIGHBOURS, params), strict=True
        ):
            pairs += [(min(a, b), max(a, b)) for b, s in found if b != a and s >= threshold]
    return sorted(set(pairs))


def find_duplicates(
    coll: Collection, index: faiss.Index, params: dict[str, Any], threshold: float
) -> list[list[Hit]]:
    """Groups (largest first), each led by its lowest id; scores are similarity to the leader."""
    from indexes.collection import Hit

    uf = UnionFind()
    with coll._lock:
        chunks = list(store.iter_vectors(coll._db, coll.dim, chunk=8192))
        copies = coll._db.execute(
            "SELECT id, duplicate_of FROM images WHERE status = "
            "'duplicate' AND duplicate_of IS NOT NULL"
        ).fetchall()
    for a, b in similar_pairs(index, params, chunks, threshold):
        uf.union(a, b)
    copy_of = dict(copies)
    for a, b in copies:
        uf.union(a, b)
    groups: dict[int, list[int]] = {}
    for a in list(uf.parent):
        groups.setdefault(uf.find(a), []).append(a)
    out = []
    for members in groups.values():
        members.sort()
        leader = members[0] if members[0] not in copy_of else copy_of[members[0]]
        with_vec = [m for m in members if m not in copy_of]
        vecs = coll.vectors(with_vec)
        lead = vecs[with_vec.index(leader)]
        score = dict(zip(with_vec, (vecs @ lead).tolist(), strict=True))
        order = [leader] + [m for m in members if m != leader]
        recs = coll.records(order)
        out.append([Hit.from_record(r, score.get(r.id, 1.0)) for r in recs])
    out.sort(key=lambda g: (-len(g), g[0].id))
    return out


def brute_force_pairs(ids: np.ndarray, vecs: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """All pairs above ``threshold`` by a full similarity matrix (the test reference)."""
    sim = vecs @ vecs.T
    a, b = np.nonzero(np.triu(sim >= threshold, k=1))
    return {(int(ids[i]), int(ids[j])) for i, j in zip(a, b, strict=True)}
