"""FAISS side: exact search against numpy, approximate indexes tuned to their recall target."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexes import Collection, Filters, index_images, vectors
from tests.indexes.conftest import consistency


def clustered(n: int, dim: int = 32, centers: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres: the structure of real embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(ids: np.ndarray, x: np.ndarray, size: int = 1000):
    for s in range(0, len(ids), size):
        yield ids[s : s + size], x[s : s + size]


def test_flat_knn_equals_numpy_and_drops_minus_one() -> None:
    x = clustered(300)
    ids = np.arange(1000, 1300, dtype=np.int64)
    index = vectors.build("Flat", 32, ids, lambda i: x[i - 1000], chunks(ids, x))
    q = clustered(5, seed=1)
    want = ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]]
    got = vectors.knn(index, q, 10)
    assert [[i for i, _ in row] for row in got] == want.tolist()
    allowed = ids[::50]  # 6 ids only, k = 10: FAISS pads with -1
    got = vectors.knn(index, q, 10, allowed=allowed)
    assert all(sorted(i for i, _ in row) == allowed.tolist() for row in got)
    assert vectors.knn(vectors.new_index("Flat", 32), q, 10) == [[]] * 5


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16"])
def test_approximate_index_tuned_to_recall(factory: str) -> None:
    x = clustered(6000)
    ids = np.arange(1, 6001, dtype=np.int64)
    index = vectors.build(factory, 32, ids, lambda i: x[i - 1], chunks(ids, x))
    assert vectors.index_ids(index).tolist() == ids.tolist()
    q = x[::60]
    truth = vectors.exact_knn(q, chunks(ids, x), 10)
    params, recall = vectors.tune(index, q, truth)
    assert recall >= vectors.TARGET_RECALL
    assert recall == vectors.recall_at(vectors.knn(index, q, 10, params), truth)
    assert set(params) == {"nprobe" if factory.startswith("IVF") else "efSearch"}


def test_exact_knn_streams_chunks() -> None:
    x = clustered(500)
    ids = np.arange(500, dtype=np.int64) * 3
    truth = vectors.exact_knn(x[:7], chunks(ids, x, size=64), 10)
    want = ids[np.argsort(-(x[:7] @ x.T), axis=1, kind="stable")[:, :10]]
    assert (np.sort(truth, axis=1) == np.sort(want, axis=1)).all()


def test_reconcile_adds_and_removes() -> None:
    x = clustered(100)
    ids = np.arange(100, dtype=np.int64)
    index = vectors.build("Flat", 32, ids, lambda i: x[i], chunks(ids, x))
    want = np.concatenate([ids[10:], [200, 201]])
    extra = {200: x[0], 201: x[1]}
    assert vectors.reconcile(index, want, lambda i: np.stack([extra[int(j)] for j in i]))
    assert vectors.index_ids(index).tolist() == want.tolist()
    hnsw = vectors.build("HNSW8", 32, ids, lambda i: x[i], chunks(ids, x))
    assert not vectors.reconcile(hnsw, ids[1:], lambda i: x[i])  # cannot remove: rebuild


def test_invalid_factory_is_refused() -> None:
    with pytest.raises(ValueError, match="factory"):
        vectors.new_index("NoSuchIndex", 8)


def test_rerank_brings_pq_near_exact() -> None:
    """PQ8 codes alone lose neighbours; re-scoring 10 x k candidates exactly restores them."""
    x = clustered(3000, dim=32, centers=40)
    ids = np.arange(1, 3001, dtype=np.int64)
    index = vectors.build("IVF16,PQ8", 32, ids, lambda i: x[i - 1], chunks(ids, x))
    q = clustered(100, dim=32, centers=40, seed=5)
    truth = vectors.exact_knn(q, chunks(ids, x), 10)
    params = {"nprobe": 16}
    plain = vectors.recall_at(vectors.knn(index, q, 10, params), truth)
    found = vectors.knn(index, q, 10, {**params, "rerank": 10}, fetch=lambda i: x[i - 1])
    reranked = vectors.recall_at(found, truth)
    assert plain < 0.9 and reranked >= 0.97, (plain, reranked)
    i, s = found[0][0]
    assert s == pytest.approx(float(x[i - 1] @ q[0]), abs=1e-5)  # exact scores, not PQ's
    tuned, recall = vectors.tune(index, q, truth, rerank=10, fetch=lambda i: x[i - 1])
    assert tuned["rerank"] == 10 and recall >= vectors.TARGET_RECALL


def test_float16_codes_rank_as_exact_without_rerank() -> None:
    """Why ``SQfp16`` skips the second pass: with every list probed its top 10 are the exact
    ones and its scores within 1e-3 of float32 inner products."""
    x = clustered(3000, dim=32, centers=40)
    ids = np.arange(1, 3001, dtype=np.int64)
    index = vectors.build("IVF16,SQfp16", 32, ids, lambda i: x[i - 1], chunks(ids, x))
    q = clustered(100, dim=32, centers=40, seed=5)
    truth = vectors.exact_knn(q, chunks(ids, x), 10)
    found = vectors.knn(index, q, 10, {"nprobe": 16})
    assert vectors.recall_at(found, truth) >= 0.995
    for row, hits in zip(q, found, strict=True):
        exact = x[np.array([i for i, _ in hits]) - 1] @ row
        assert np.abs(exact - [s for _, s in hits]).max() < 1e-3


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,SQfp16", "IVF16,SQ8", "IVF16,PQ8"])
def test_mmap_index_searches_like_the_loaded_one(factory: str, tmp_path: Path) -> None:
    x = clustered(3000, dim=64)
    ids = np.arange(1, 3001, dtype=np.int64) * 7
    index = vectors.build(factory, 64, ids, lambda i: x[i // 7 - 1], chunks(ids, x))
    vectors.save(index, tmp_path / "i.faiss")
    mapped = vectors.load(tmp_path / "i.faiss", mmap=True)
    lists = faiss.extract_index_ivf(mapped).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    assert faiss.downcast_InvertedLists(lists).prefetch_nthread == 0  # no threads per search
    q = clustered(20, dim=64, seed=3)
    for allowed in (None, ids[::5]):
        want = vectors.knn(vectors.load(tmp_path / "i.faiss"), q, 10, {"nprobe": 4}, allowed)
        assert vectors.knn(mapped, q, 10, {"nprobe": 4}, allowed) == want


def test_collection_with_approximate_index(images: Path, encoder_dir: Path, tmp_path: Path) -> None:
    index_images([images], tmp_path / "c", encoder_dir, workers=0, index_type="IVF4,Flat")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["index"]["factory"] == "IVF4,Flat" and m["index"]["recall_at_10"] >= 0.95
    assert isinstance(faiss.read_index(str(tmp_path / "c" / "index.faiss")), faiss.IndexIVFFlat)
    with Collection.open(tmp_path / "c") as c:
        for i in c.labeled()[0]:
            assert c.search_id(int(i), k=1)[0].id == i
        assert {h.label for h in c.search_id(int(i), k=20, filters=Filters(label="cat"))} == {"cat"}
    (images / "cat" / "000.png").unlink()
    index_images([images], tmp_path / "c", None, workers=0, index_type="IVF4,Flat")
    assert consistency(tmp_path / "c") == {"ok": 15}


@pytest.mark.parametrize("step", [3, 1000])
def test_selector_selects_exactly_and_is_built_once(step: int) -> None:
    """Dense id sets get a bitmap, sparse ones a hash set; both select exactly ``allowed``,
    and a filter's array keeps its selector until the array is gone."""
    allowed = np.arange(7, 20_000, step, dtype=np.int64)
    sel = vectors.selector(allowed)
    kind = faiss.IDSelectorBitmap if step == 3 else faiss.IDSelectorBatch
    assert isinstance(sel, kind)
    member = np.zeros(20_010, dtype=bool)
    member[allowed] = True
    assert [sel.is_member(i) for i in range(20_010)] == member.tolist()
    assert vectors.selector(allowed) is sel
    assert vectors.selector(allowed.copy()) is not sel
    del allowed
    assert id(sel) not in {id(s) for s in vectors._selectors.values()}


def test_many_lists_get_a_graph_quantizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """From ``GRAPH_MIN_LISTS`` lists the coarse quantizer is an HNSW graph over the trained
    centroids, kept through save and a mapped load, and it probes the lists a flat one would."""
    x = clustered(3000, dim=32, centers=40)
    ids = np.arange(1, 3001, dtype=np.int64)
    q = clustered(100, dim=32, centers=40, seed=5)
    flat = vectors.build("IVF32,SQfp16", 32, ids, lambda i: x[i - 1], chunks(ids, x))
    monkeypatch.setattr(vectors, "GRAPH_MIN_LISTS", 32)
    index = vectors.build("IVF32,SQfp16", 32, ids, lambda i: x[i - 1], chunks(ids, x))
    vectors.save(index, tmp_path / "i.faiss")
    for ix in (index, vectors.load(tmp_path / "i.faiss", mmap=True)):
        graph = faiss.downcast_index(faiss.extract_index_ivf(ix).quantizer)
        assert isinstance(graph, faiss.IndexHNSWFlat) and graph.ntotal == 32
    assert isinstance(
        faiss.downcast_index(faiss.extract_index_ivf(flat).quantizer), faiss.IndexFlat
    )
    truth = vectors.exact_knn(q, chunks(ids, x), 10)
    want = vectors.recall_at(vectors.knn(flat, q, 10, {"nprobe": 4}), truth)
    assert vectors.recall_at(vectors.knn(ix, q, 10, {"nprobe": 4}), truth) >= want - 0.01


def test_tune_stops_where_recall_stops_rising() -> None:
    """Codes too coarse for the target: tune keeps the nprobe after which doubling gains less
    than PLATEAU, not the largest (a scan of every list)."""
    x = clustered(6000, dim=32, centers=40)
    ids = np.arange(1, 6001, dtype=np.int64)
    index = vectors.build("IVF64,PQ4", 32, ids, lambda i: x[i - 1], chunks(ids, x))
    q = clustered(200, dim=32, centers=40, seed=5)
    truth = vectors.exact_knn(q, chunks(ids, x), 10)
    params, recall = vectors.tune(index, q, truth, target=0.999)
    assert params["nprobe"] < 64 and recall < 0.9
    assert recall == vectors.recall_at(vectors.knn(index, q, 10, params), truth)
    doubled = vectors.knn(index, q, 10, {"nprobe": 2 * params["nprobe"]})
    assert vectors.recall_at(doubled, truth) < recall + vectors.PLATEAU
