"""Weighted k-nearest-neighbour classifier on frozen features: needs no training at all.

As in InstDisc (Wu et al. 2018, https://arxiv.org/abs/1805.01978, eq. 8) and the kNN monitor of
the official MoCo CIFAR-10 demo: each query takes its ``k`` most similar training features
(cosine similarity ``s``), every neighbour votes for its class with weight ``exp(s / T)``, and the
class scores are the sums of the votes. Symbols:
    k: number of neighbours (200).
    T: temperature of the vote weights (0.1); smaller T trusts the closest neighbours more.

The similarity matrix is computed ``chunk`` queries at a time, so memory stays at
``chunk x N_train`` whatever the number of queries.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moco.config import KNN_K, KNN_T

ArrayLike = np.ndarray | torch.Tensor


def _tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


@torch.inference_mode()
def knn_predict(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    query_feats: ArrayLike,
    num_classes: int,
    k: int = KNN_K,
    T: float = KNN_T,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores of each query: the sums of ``exp(sim / T)`` over its ``k`` nearest neighbours,
    each query's scaled by ``exp(-max sim / T)`` (its nearest neighbour weighs 1): unscaled, a
    small ``T`` overflows float32 (``exp(1 / 0.01)``) into inf, and the shares into NaN. The
    scaling changes neither the argmax nor the shares.

    Features are L2-normalised here, so ``sim`` is the cosine similarity whatever the caller
    passes. ``k`` larger than the training set uses every training feature.

    Args:
        train_feats: NxD features of the labelled images.
        train_labels: N integer class indexes in ``[0, num_classes)``.
        query_feats: QxD features to classify.
        num_classes: C.
        k: neighbours per query.
        T: temperature of the vote weights.
        chunk: queries per similarity block (memory, not results).

    Returns:
        QxC float32 scores; ``scores.argmax(1)`` is the prediction and ``scores / scores.sum(1)``
        a confidence in [0, 1].

    Examples:
        >>> scores = knn_predict(bank, bank_labels, queries, num_classes=10)  # doctest: +SKIP
        >>> top5 = scores.topk(5, dim=1).indices
    """
    if k < 1 or T <= 0:
        raise ValueError(f"k must be >= 1 and T > 0, got k={k}, T={T}")
    bank = F.normalize(_tensor(train_feats).float(), dim=1)  # NxD
    labels = _tensor(train_labels).long().to(bank.device)  # N
    queries = F.normalize(_tensor(query_feats).float(), dim=1).to(bank.device)
    if bank.shape[0] != labels.shape[0]:
        raise ValueError(f"{bank.shape[0]} training features but {labels.shape[0]} labels")
    if bank.shape[0] == 0:
        raise ValueError("kNN needs at least one labelled feature")
    if labels.min() < 0 or labels.max() >= num_classes:
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must lie in [0, {num_classes}), got {lo}..{hi}")
    k = min(k, bank.shape[0])
    out = torch.zeros(queries.shape[0], num_classes)
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T  # BxN
        top_sim, top_idx = sim.topk(k, dim=1)  # Bxk
        weights = ((top_sim - top_sim[:, :1]) / T).exp()  # Bxk; topk sorts: column 0 is the max
        votes = torch.zeros(sim.shape[0], num_classes, device=bank.device)  # BxC
        votes.scatter_add_(1, labels[top_idx], weights)
        out[start : start + chunk] = votes.cpu()
    return out


def knn_top1(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    query_feats: ArrayLike,
    query_labels: ArrayLike,
    num_classes: int,
    k: int = KNN_K,
    T: float = KNN_T,
) -> float:
    """Top-1 accuracy (percent) of the weighted kNN classifier, the MoCo CIFAR demo's monitor."""
    scores = knn_predict(train_feats, train_labels, query_feats, num_classes, k=k, T=T)
    truth = _tensor(query_labels).long()
    if truth.numel() == 0:
        return float("nan")
    return 100.0 * (scores.argmax(1) == truth).float().mean().item()
