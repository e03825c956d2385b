"""Choosing an index for a memory budget: the most accurate type whose estimate fits."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from indexes import Collection, budget, index_images, vectors
from indexes.manifest import read_manifest
from tests.indexes.conftest import consistency


@pytest.mark.parametrize(
    ("n", "limit", "want"),
    [
        (10_000, "2GB", "Flat"),
        (10_000, "10MB", "IVF256,SQ8"),  # Flat is 20.6 MB
        (200_000, "2GB", "IVF2048,Flat"),
        (1_000_000, "2GB", "IVF4096,SQfp16"),  # IVF-Flat would be 2.06 GB
        (1_000_000, "1GB", "IVF4096,SQ8"),  # float16 codes would be 1.04 GB
        (1_000_000, "3GB", "IVF4096,Flat"),
        (1_000_000, "200MB", "IVF4096,PQ128"),
        (10_000_000, "2GB", "IVF16384,PQ128"),
        (10_000_000, "1GB", "IVF16384,PQ64"),
        (100_000_000, "2GB", "IVF32768,PQ8"),
        (100_000_000, "1GB", "IVF32768,PQ8"),  # nothing fits: the smallest, with a warning
    ],
)
def test_budget_picks_the_most_accurate_that_fits(n: int, limit: str, want: str) -> None:
    choice = budget.choose(n, 512, budget.parse_bytes(limit))
    assert choice.factory == want
    exact = want.endswith(("Flat", "SQfp16"))
    assert choice.rerank == (0 if exact else 4 if "SQ8" in want else 10)


def test_estimate_matches_the_real_index() -> None:
    """The estimate is within 10% of what FAISS serializes, for each kind of code."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10_000, 16)).astype(np.float32)
    ids = np.arange(len(x), dtype=np.int64)
    for factory in ("Flat", "IVF32,Flat", "IVF32,SQfp16", "IVF32,SQ8", "IVF32,PQ4"):
        index = vectors.build(factory, 16, ids, lambda i: x[i], [(ids, x)])
        real = vectors.memory_bytes(index)
        assert abs(budget.estimate(factory, len(x), 16) - real) < 0.1 * real, factory
    assert isinstance(index, faiss.IndexIVFPQ)


def test_parse_bytes() -> None:
    assert budget.parse_bytes("2GB") == 2_000_000_000
    assert budget.parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert budget.parse_bytes("500m") == 500_000_000
    assert budget.parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="memory size"):
        budget.parse_bytes("lots")


@pytest.mark.parametrize(
    "n, text",
    [(1, "1 B"), (999, "999 B"), (2_252_274, "2.3 MB"), (2 * 10**9, "2.0 GB"), (5e15, "5000.0 TB")],
)
def test_format_bytes_prints_what_parse_bytes_reads(n: int, text: str) -> None:
    """``info`` prints sizes in the units ``--max-index-memory`` reads: "2.0 GB" given back is
    the same 2e9 bytes (it printed units of 1024 labelled MB, 5% off at GB)."""
    assert budget.format_bytes(n) == text
    assert budget.parse_bytes(text) == pytest.approx(n, rel=0.05)


def test_collection_follows_its_budget_and_keeps_it(
    images: Path, encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget too small for exact codes gives compressed ones (re-ranked, recall stored);
    a re-run keeps the collection's budget; a new type needs no re-embedding."""
    monkeypatch.setattr(budget, "FLAT_MAX", 0)  # 16 vectors: IVF would never be chosen
    monkeypatch.setattr(budget, "nlist_for", lambda n: 2)
    coll = tmp_path / "c"
    index_images([images], coll, encoder_dir, workers=0, max_index_memory="20kB")
    m = read_manifest(coll)["index"]
    assert m["factory"] == "IVF2,SQ8" and m["params"]["rerank"] == 4
    assert m["max_index_memory"] == 20_000 and m["recall_at_10"] >= 0.95
    with Collection.open(coll) as c:
        assert c.search_id(3, k=1)[0].id == 3
    index_images([], coll, None, workers=0)
    assert read_manifest(coll)["index"]["factory"] == "IVF2,SQ8"
    report = index_images([], coll, None, workers=0, index_type="Flat")
    assert report.added == 0 and read_manifest(coll)["index"]["factory"] == "Flat"
    assert consistency(coll) == {"ok": 16}
