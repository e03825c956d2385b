"""Filtered search at scale: exact, post-filter and prefilter paths all return k hits when k
ids match, only matching ids, and close to the exact filtered top k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexes import Collection, Filters, filters, index_images, vectors
from tests.indexes.test_vectors import chunks, clustered


@pytest.fixture(scope="module")
def ivf() -> tuple[object, np.ndarray, np.ndarray]:
    x = clustered(8000, dim=32, centers=64)
    ids = np.arange(1, 8001, dtype=np.int64)
    index = vectors.build("IVF64,SQ8", 32, ids, lambda i: x[i - 1], chunks(ids, x))
    return index, ids, x


@pytest.mark.parametrize("share", [0.0002, 0.002, 0.02, 0.3, 1.0])
def test_filtered_search_returns_k_of_the_allowed(
    ivf: tuple[object, np.ndarray, np.ndarray], share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filters, "EXACT_MAX", 0)  # force the index paths even for few ids
    index, ids, x = ivf
    rng = np.random.default_rng(1)
    allowed = np.sort(rng.choice(ids, size=max(1, int(share * len(ids))), replace=False))
    fetch = lambda i: x[np.asarray(i) - 1]  # noqa: E731
    q = clustered(30, dim=32, centers=64, seed=9)
    hits = 0
    for row in q:
        got = filters.filtered_knn(
            index, row[None], 10, {"nprobe": 8, "rerank": 4}, allowed, fetch, exact=False
        )
        assert len(got) == min(10, len(allowed))
        assert set(i for i, _ in got) <= set(allowed.tolist())
        want = filters.exact_top(row[None], allowed, fetch, 10)
        hits += len({i for i, _ in got} & {i for i, _ in want})
    assert hits / (30 * min(10, len(allowed))) >= 0.9


def test_collection_filter_never_short(
    images: Path, encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filters, "EXACT_MAX", 0)
    index_images([images], tmp_path / "c", encoder_dir, workers=0, index_type="IVF4,SQ8")
    with Collection.open(tmp_path / "c") as c:
        for label, n in (("cat", 6), ("owl", 4)):
            hits = c.search_id(1, k=5, filters=Filters(label=label))
            assert len(hits) == min(5, n) and {h.label for h in hits} == {label}
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)
            stored = c.vectors([h.id for h in hits]) @ c.vectors([1])[0]
            np.testing.assert_allclose(scores, stored, atol=1e-5)  # exact, re-ranked
