"""InfoNCE against a loop written from the paper's pseudocode (Algorithm 1) and a closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moco.loss import info_nce, moco_logits, topk_accuracy


def naive_info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> float:
    """Per query: -log( exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.k_j/T)) ), averaged."""
    losses = []
    for n in range(q.shape[0]):
        pos = math.exp(float(q[n] @ k[n]) / t)
        neg = sum(math.exp(float(q[n] @ queue[:, j]) / t) for j in range(queue.shape[1]))
        losses.append(-math.log(pos / (pos + neg)))
    return float(np.mean(losses))


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_matches_naive_loop(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(8, 11, generator=g, dtype=torch.float64), dim=0)
    logits, labels = moco_logits(q, k, queue, t)
    assert logits.shape == (5, 12) and labels.tolist() == [0] * 5
    expected = naive_info_nce(q.numpy(), k.numpy(), queue.numpy(), t)
    assert info_nce(logits, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("K", [1, 16, 4096])
def test_identical_directions_give_log_k_plus_one(K: int) -> None:
    v = F.normalize(torch.randn(1, 32), dim=1)
    q, k, queue = v.repeat(4, 1), v.repeat(4, 1), v.T.repeat(1, K)
    loss = info_nce(*moco_logits(q, k, queue, temperature=0.2))
    assert loss.item() == pytest.approx(math.log(K + 1), rel=1e-5)


def test_positive_far_above_negatives_gives_near_zero_loss() -> None:
    q = torch.eye(4)
    queue = -torch.eye(4)  # each negative is opposite or orthogonal to every query
    loss = info_nce(*moco_logits(q, q.clone(), queue, temperature=0.05))
    assert loss.item() < 1e-6


def test_topk_accuracy() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.zeros(3, dtype=torch.long)
    top1, top2 = topk_accuracy(logits, labels, ks=(1, 2))
    assert top1 == pytest.approx(100 / 3)
    assert top2 == pytest.approx(100 / 3)  # row 1 ranks label 0 last, row 2 too
    assert topk_accuracy(logits, labels, ks=(3,))[0] == pytest.approx(100.0)


def test_excluded_keys_count_as_if_removed_from_the_queue() -> None:
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 6, generator=g), dim=0)
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[0, 2] = exclude[2, [0, 5]] = True
    logits, labels = moco_logits(q, k, queue, 0.2, exclude=exclude)
    losses = F.cross_entropy(logits, labels, reduction="none")
    for n in range(3):
        kept = queue[:, ~exclude[n]].double().numpy()
        expected = naive_info_nce(
            q[n : n + 1].double().numpy(), k[n : n + 1].double().numpy(), kept, 0.2
        )
        assert losses[n].item() == pytest.approx(expected, rel=1e-5)
