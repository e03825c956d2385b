"""The FAISS side of a collection: building, tuning, reconciling and searching an index.

Vectors are unit norm and the metric is inner product, so scores are cosine similarities. FAISS
ids are the SQLite ``images.id``: flat and graph indexes are wrapped in ``IndexIDMap``, IVF
indexes store the ids themselves. ``auto`` picks the type for a memory budget (``budget``);
it is trained on a sample, with ``nprobe`` raised until recall@10 against exact search reaches
``TARGET_RECALL``. Compressed codes (SQ8, PQ) only propose candidates: ``knn`` re-scores the top
``rerank x k`` with the exact stored vectors (``fetch``), so the scores it returns are exact.
An index is trained and filled on the GPU when there is one (``gpu``); the file is a CPU index.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import faiss
import numpy as np

from indexes import gpu
from indexes.faults import atomic_file

INDEX_NAME = "index.faiss"
TARGET_RECALL = 0.98
PLATEAU = 0.002
"""``tune`` stops raising nprobe (efSearch) when recall@10 gains less than this."""
GRAPH_MIN_LISTS = 4096
"""IVF indexes of at least this many lists get a graph (HNSW) coarse quantizer."""
FetchVectors = Callable[[np.ndarray], np.ndarray]


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
    if is_ivf(index):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            # the factory turns on polysemous training (Hamming pre-filtering, unused here):
            # 95% of the training time, 117 of 124 s for IVF16,PQ16 on 5,000 vectors
            ivf.do_polysemous_training = False
        return index
    if isinstance(index, faiss.IndexIDMap):
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
    cpu = new_index(factory, dim)
    index = gpu.to_gpu(cpu) if is_ivf(cpu) else cpu
    m = train_size(cpu, len(ids))
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
    on_gpu = index is not cpu
    if not on_gpu:
        graph_quantizer(index)  # the adds find their lists through the graph too
    for chunk_ids, vecs in chunks:
        index.add_with_ids(vecs, chunk_ids)
    index = gpu.to_cpu(index)
    if on_gpu:
        graph_quantizer(index)
    return index


def graph_quantizer(index: faiss.Index) -> None:
    """Give an IVF index of many lists an HNSW graph over its centroids as coarse quantizer.

    A flat quantizer compares each query with every centroid: at 4,096 lists of 512 dims it
    reads 8 MB a query, 0.3 of a 0.9 ms search at 1M vectors (0.58 ms with the graph, the same
    recall@10: 0.996 at nprobe 8). The lists and codes are unchanged; the GPU, which has no
    graph quantizer, trains and adds with the flat one first.
    """
    if not is_ivf(index):
        return
    ivf = faiss.extract_index_ivf(index)
    flat = faiss.downcast_index(ivf.quantizer)
    if ivf.nlist < GRAPH_MIN_LISTS or not isinstance(flat, faiss.IndexFlat) or not ivf.is_trained:
        return
    graph = faiss.IndexHNSWFlat(ivf.d, 32, ivf.metric_type)
    graph.hnsw.efConstruction = 80
    graph.add(flat.reconstruct_n(0, ivf.nlist))
    if ivf.own_fields:
        flat.this.acquire()  # Python frees the old quantizer when ``flat`` goes
    graph.this.disown()
    ivf.quantizer, ivf.own_fields = graph, True


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


def selector(allowed: np.ndarray) -> faiss.IDSelector:
    """A FAISS id selector for the sorted ids ``allowed``, built once per array.

    Building it is the cost: an ``IDSelectorBatch`` (a hash set) of 50k ids took 7 ms, 200k
    ids 97 ms, many times the search it restricts. ``Collection`` keeps one array per filter,
    so a UI repeating its filter reuses the selector too; it is dropped with its array. Many ids
    get a bitmap instead (one bit per id up to the largest, filled by numpy: ~1 ms per million).
    """
    key = id(allowed)
    sel = _selectors.get(key)
    if sel is None:
        if len(allowed) and 64 * len(allowed) > int(allowed[-1]):
            bits = np.zeros(int(allowed[-1]) + 1, dtype=bool)
            bits[allowed] = True
            sel = faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))
        else:
            sel = faiss.IDSelectorBatch(allowed)
        _selectors[key] = sel
        weakref.finalize(allowed, _selectors.pop, key, None)
    return sel


_selectors: dict[int, faiss.IDSelector] = {}


def search_params(
    index: faiss.Index, params: dict[str, Any], allowed: np.ndarray | None = None
) -> faiss.SearchParameters | None:
    """Per-call parameters (thread-safe, unlike setting ``nprobe`` on the index)."""
    sel = selector(allowed) if allowed is not None else None
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
    fetch: FetchVectors | None = None,
) -> list[list[tuple[int, float]]]:
    """Top ``k`` (id, score) per query row; FAISS's ``-1`` padding never surfaces.

    With ``fetch`` and a ``rerank`` depth in ``params``, ``rerank * k`` candidates are taken
    from the index and re-scored exactly with the vectors ``fetch`` returns.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, index.d)
    depth = int((params or {}).get("rerank", 0)) if fetch is not None else 0
    want = max(1, min(k * max(depth, 1), index.ntotal)) if index.ntotal else 0
    if want == 0:
        return [[] for _ in queries]
    p = search_params(index, params or {}, allowed)
    scores, ids = index.search(queries, want, params=p)
    found = [
        [(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
        for row_i, row_s in zip(ids, scores, strict=True)
    ]
    return rerank(queries, found, fetch, k) if depth and fetch is not None else found


def rerank(
    queries: np.ndarray, found: list[list[tuple[int, float]]], fetch: FetchVectors, k: int
) -> list[list[tuple[int, float]]]:
    """The ``k`` best of each query's candidates by exact inner product with stored vectors."""
    ids = np.unique(np.fromiter((i for row in found for i, _ in row), dtype=np.int64))
    if not len(ids):
        return [[] for _ in found]
    vecs = fetch(ids)  # U x D, rows in the order of ids (sorted)
    out = []
    for q, row in zip(queries, found, strict=True):
        cand = np.array([i for i, _ in row], dtype=np.int64)
        s = vecs[np.searchsorted(ids, cand)] @ q
        top = np.argsort(-s, kind="stable")[:k]
        out.append([(int(cand[j]), float(s[j])) for j in top])
    return out


def exact_knn(
    queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> np.ndarray:
    """Exact top-``k`` ids by brute force over streamed chunks (the recall reference)."""
    best = TopK(len(queries), k)
    for ids, vecs in chunks:
        s, j = faiss.knn(queries, vecs, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        best.add(s, ids[j])
    return best.ids


class TopK:
    """The running top ``k`` ids of each query, by score, over chunks of candidates."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((queries, 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((queries, 0), dtype=np.int64)

    def add(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Merge candidates: ``scores`` (Q x C) of ``ids`` (Q x C, or C shared by every query)."""
        s = np.hstack([self.scores, scores])
        i = np.hstack([self.ids, np.broadcast_to(ids, scores.shape)])
        if s.shape[1] > self.k:  # wide chunks (a benchmark's 100k columns): partition first
            part = np.sort(np.argpartition(-s, self.k - 1, axis=1)[:, : self.k], axis=1)
            s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
        top = np.argsort(-s, axis=1, kind="stable")
        self.scores, self.ids = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)


def recall_at(found: list[list[tuple[int, float]]], truth: np.ndarray, k: int = 10) -> float:
    hits = sum(
        len({i for i, _ in f[:k]} & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / max(1, sum(min(k, len(t)) for t in truth))


def tune(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    target: float = TARGET_RECALL,
    rerank: int = 0,
    fetch: FetchVectors | None = None,
) -> tuple[dict[str, Any], float]:
    """The cheapest search parameter reaching ``target`` recall@10, and the recall reached.

    With ``rerank`` and ``fetch`` the recall is that of the re-ranked results, as served.
    Compressed codes can top out below the target; once doubling the parameter gains less
    than ``PLATEAU`` the previous value is kept, rather than scanning every list for nothing.
    """
    base = {"rerank": rerank} if rerank and fetch is not None else {}
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if is_ivf(index):
        name, values = (
            "nprobe",
            [2**i for i in range(17) if 2**i <= faiss.extract_index_ivf(index).nlist],
        )
    elif isinstance(inner, faiss.IndexHNSW):
        name, values = "efSearch", [16, 32, 64, 128, 256, 512]
    else:
        return base, recall_at(knn(index, queries, 10, base, fetch=fetch), truth)
    best: tuple[dict[str, Any], float] = ({**base, name: values[0]}, -1.0)
    for v in values:
        params = {**base, name: v}
        recall = recall_at(knn(index, queries, 10, params, fetch=fetch), truth)
        if recall < best[1] + PLATEAU:
            break
        best = params, recall
        if recall >= target:
            break
    return best


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
    """Read an index; ``mmap`` maps it read-only where FAISS allows.

    An IVF index then reads only its centroids: its inverted lists become
    ``OnDiskInvertedLists`` over the file, paged in by the queries that probe them, so opening
    takes milliseconds at any size and the resident memory is what the queries touch.
    """
    if not mmap:
        return faiss.read_index(str(path))
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(str(path))
    if is_ivf(index):
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            # before each search FAISS starts 32 threads to touch the probed lists' pages: on a
            # warm page cache that doubled a 100k-vector search (0.31 -> 0.14 ms at nprobe 4)
            lists.prefetch_nthread = 0
    return index


def memory_bytes(index: faiss.Index) -> int:
    """Serialized size of ``index``: what it takes in RAM or in the page cache."""
    return int(faiss.serialize_index(index).size)
