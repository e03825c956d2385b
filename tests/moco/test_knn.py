"""The weighted kNN classifier against a brute-force loop written from InstDisc's definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moco.knn import knn_predict, knn_top1


def brute_force(
    bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, c: int, k: int, t: float
) -> np.ndarray:
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.zeros((len(queries), c))
    for qi, q in enumerate(queries):
        sims = [(float(q @ b), j) for j, b in enumerate(bank)]
        for s, j in sorted(sims, reverse=True)[: min(k, len(bank))]:
            out[qi, labels[j]] += np.exp(s / t)
    return out


@pytest.mark.parametrize(("k", "chunk"), [(1, 1024), (5, 3), (7, 1024), (500, 4)])
def test_equals_brute_force(k: int, chunk: int) -> None:
    rng = np.random.default_rng(k)
    bank = rng.normal(size=(40, 8)).astype(np.float32) * rng.uniform(0.1, 5, size=(40, 1))
    labels = rng.integers(0, 4, 40)
    queries = rng.normal(size=(11, 8)).astype(np.float32)
    got = knn_predict(bank, labels, queries, num_classes=4, k=k, T=0.1, chunk=chunk).numpy()
    want = brute_force(bank, labels, queries, 4, k, 0.1)
    share = want / want.sum(1, keepdims=True)  # each query's scores are scaled, not changed
    np.testing.assert_allclose(got / got.sum(1, keepdims=True), share, rtol=2e-4, atol=1e-7)
    assert got.max(1).min() >= 1.0  # the nearest neighbour weighs 1
    assert got.shape == (11, 4) and got.dtype == np.float32


def test_a_small_temperature_does_not_overflow() -> None:
    """exp(sim / T) overflowed float32 past sim / T = 88: an exact match at T = 0.01 made the
    vote inf and its share NaN (``probe predict --knn --knn-t 0.01`` printed "nan%", and its
    JSON was not JSON)."""
    bank = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]])
    scores = knn_predict(bank, torch.tensor([0, 1, 1]), bank[:1], 2, k=3, T=0.001)
    assert torch.isfinite(scores).all() and scores.argmax(1).item() == 0
    share = scores / scores.sum(1, keepdim=True)
    assert share[0, 0] > 0.999 and torch.isfinite(share).all()


def test_temperature_changes_the_vote() -> None:
    # One close neighbour of class 0 against two farther ones of class 1: a small T trusts the
    # closest, a large T counts heads.
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, labels, q, 2, k=3, T=0.05).argmax(1).item() == 0
    assert knn_predict(bank, labels, q, 2, k=3, T=10.0).argmax(1).item() == 1


def test_top1_and_errors() -> None:
    bank = torch.eye(3)
    assert knn_top1(bank, torch.arange(3), bank, torch.arange(3), 3, k=1) == 100.0
    with pytest.raises(ValueError, match="labels must lie"):
        knn_predict(bank, torch.tensor([0, 1, 3]), bank, 3)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(bank, torch.arange(3), bank, 3, k=0)
