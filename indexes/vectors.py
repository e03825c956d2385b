"""The FAISS side of a collection: choosing, building, tuning, reconciling and searching an index.

Vectors are unit norm and the metric is inner product, so scores are cosine similarities. FAISS
ids are the SQLite ``images.id``: flat and graph indexes are wrapped in ``IndexIDMap``, IVF
indexes store the ids themselves. ``auto`` picks exact search up to ``FLAT_MAX`` vectors, then
``IVF<nlist>,Flat`` (supports incremental add and remove, unlike HNSW), trained on a sample,
with ``nprobe`` raised until recall@10 against exact search reaches ``TARGET_RECALL``. Compressed
codes (``IVF..,SQ8`` 4x, ``IVF..,PQ..`` more) can be chosen with a factory string; on tightly
clustered embeddings SQ8 alone topped out near 0.94 recall@10 in our tests, so it is not the
default.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import faiss
import numpy as np

from indexes.faults import atomic_file

INDEX_NAME = "index.faiss"
FLAT_MAX = 50_000
TARGET_RECALL = 0.95
FetchVectors = Callable[[np.ndarray], np.ndarray]


def choose_factory(n: int) -> str:
    """The FAISS factory string ``auto`` means for ``n`` vectors."""
    if n <= FLAT_MAX:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return f"IVF{min(max(nlist, 256), 65536)},Flat"


def is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for ``factory`` whose ``add_with_ids`` takes SQLite ids."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = str(e).splitlines()[-1].rsplit(": ", 1)[-1]  # FAISS prefixes its C++ location
        raise ValueError(
            f"Invalid FAISS factory string {factory!r} ({why}); use 'auto' or one such as "
            "Flat, HNSW32, IVF1024,Flat or IVF1024,SQ8"
        ) from e
    if is_ivf(index) or isinstance(index, faiss.IndexIDMap):
        return index
    return faiss.IndexIDMap(index)


def train_size(index: faiss.Index, n: int) -> int:
    """Vectors to train on: about 64 per IVF list (FAISS warns below 39), at most all of them."""
    if index.is_trained:
        return 0
    nlist = faiss.extract_index_ivf(index).nlist if is_ivf(index) else 256
    return min(n, max(64 * nlist, 10_000))


def build(
    factory: str,
    dim: int,
    ids: np.ndarray,
    fetch: FetchVectors,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
) -> faiss.Index:
    """A new index over all ``chunks`` of (ids, vectors), trained on a random sample first."""
    index = new_index(factory, dim)
    m = train_size(index, len(ids))
    if m:
        sample = np.sort(np.random.default_rng(seed).choice(ids, size=m, replace=False))
        try:
            index.train(fetch(sample))
        except RuntimeError as e:  # e.g. fewer vectors than IVF lists
            raise ValueError(
                f"Cannot build an index of type {factory} over {len(ids)} vectors "
                f"({str(e).splitlines()[-1].rsplit(': ', 1)[-1]}); the vectors are stored: "
                "re-run with another index type"
            ) from e
    for chunk_ids, vecs in chunks:
        index.add_with_ids(vecs, chunk_ids)
    return index


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids stored in ``index``, sorted."""
    if isinstance(index, faiss.IndexIDMap):
        return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if lists.list_size(i)
    ]
    return np.sort(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, np.int64)


def reconcile(index: faiss.Index, want: np.ndarray, fetch: FetchVectors) -> bool:
    """Make ``index`` hold exactly the ids ``want``; False when it cannot remove (rebuild it)."""
    have = index_ids(index)
    extra = np.setdiff1d(have, want, assume_unique=True)
    missing = np.setdiff1d(want, have, assume_unique=True)
    if len(extra):
        try:
            index.remove_ids(faiss.IDSelectorBatch(extra))
        except RuntimeError:
            return False
    for start in range(0, len(missing), 65536):
        part = missing[start : start + 65536]
        index.add_with_ids(fetch(part), part)
    return True


def search_params(
    index: faiss.Index, params: dict[str, Any], allowed: np.ndarray | None = None
) -> faiss.SearchParameters | None:
    """Per-call parameters (thread-safe, unlike setting ``nprobe`` on the index)."""
    sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
    if is_ivf(index):
        p = faiss.SearchParametersIVF()
        p.nprobe = int(params.get("nprobe", 1))
    elif "efSearch" in params:
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(params["efSearch"])
    elif sel is None:
        return None
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
        p._keep_sel = sel  # the Python object must outlive the C++ pointer
    return p


def knn(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    params: dict[str, Any] | None = None,
    allowed: np.ndarray | None = None,
) -> list[list[tuple[int, float]]]:
    """Top ``k`` (id, score) per query row; FAISS's ``-1`` padding never surfaces."""
    queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, index.d)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 0
    if k == 0:
        return [[] for _ in queries]
    p = search_params(index, params or {}, allowed)
    scores, ids = index.search(queries, k, params=p) if p is not None else index.search(queries, k)
    return [
        [(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
        for row_i, row_s in zip(ids, scores, strict=True)
    ]


def exact_knn(
    queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> np.ndarray:
    """Exact top-``k`` ids by brute force over streamed chunks (the recall reference)."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for ids, vecs in chunks:
        s, j = faiss.knn(queries, vecs, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s = np.hstack([best_s, s])
        best_i = np.hstack([best_i, ids[j]])
        top = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, top, 1)
        best_i = np.take_along_axis(best_i, top, 1)
    return best_i


def recall_at(found: list[list[tuple[int, float]]], truth: np.ndarray, k: int = 10) -> float:
    hits = sum(
        len({i for i, _ in f[:k]} & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / max(1, sum(min(k, len(t)) for t in truth))


def tune(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, target: float = TARGET_RECALL
) -> tuple[dict[str, Any], float]:
    """The cheapest search parameter reaching ``target`` recall@10, and the recall reached."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if is_ivf(index):
        name, values = (
            "nprobe",
            [2**i for i in range(17) if 2**i <= faiss.extract_index_ivf(index).nlist],
        )
    elif isinstance(inner, faiss.IndexHNSW):
        name, values = "efSearch", [16, 32, 64, 128, 256, 512]
    else:
        return {}, recall_at(knn(index, queries, 10), truth)
    params, recall = {name: values[-1]}, 0.0
    for v in values:
        params = {name: v}
        recall = recall_at(knn(index, queries, 10, params), truth)
        if recall >= target:
            break
    return params, recall


def save(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one.

    FAISS reports a failed write as a ``RuntimeError`` naming the C error; it becomes the
    ``OSError`` it is (``ENOSPC`` for a full disk), so callers can tell what happened.
    """
    with atomic_file(path) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:
            msg = str(e).splitlines()[-1]
            if "No space left on device" in msg:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
            raise OSError(errno.EIO, f"FAISS could not write the index ({msg})", str(path)) from e


def load(path: str | os.PathLike, mmap: bool = False) -> faiss.Index:
    """Read an index; ``mmap`` maps it read-only where FAISS allows (IVF lists stay on disk)."""
    if not mmap:
        return faiss.read_index(str(path))
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(str(path))


def memory_bytes(index: faiss.Index) -> int:
    """Serialized size of ``index``: what it takes in RAM or in the page cache."""
    return int(faiss.serialize_index(index).size)
