"""Accuracy with an honest error bar, per-class results, confusion matrices, retrieval metrics.

Users who label a handful of images need to know how much a held-out accuracy can be trusted:
3 right out of 4 is "somewhere between 30% and 95%", and the Wilson score interval
(https://en.wikipedia.org/wiki/Binomial_proportion_confidence_interval#Wilson_score_interval)
says so where the textbook ``p +- 1.96 sqrt(p(1-p)/n)`` would claim [33%, 117%] or, at 4/4, [100%,
100%].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


def stratified_split(
    labels: Sequence[Any] | np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indexes with every class in the same proportion.

    A class with n >= 2 images gives ``max(1, round(n * val_fraction))`` of them to the held-out
    set, but always keeps one for training; a class with a single image trains only. So 2 labels
    per class already give a (small, say so) held-out estimate.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in sorted(set(labels.tolist()), key=str):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = (
            0
            if len(idx) < 2 or val_fraction == 0
            else min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        )
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def stratified_folds(
    labels: Sequence[Any] | np.ndarray, n_folds: int = 5, seed: int = 0
) -> list[np.ndarray]:
    """Held-out indexes of ``n_folds`` cross-validation folds, each class spread over them.

    Every image of a class with n >= 2 images is held out exactly once, in a fold that leaves at
    least one image of its class for training (``min(n, n_folds)`` folds are used per class);
    a class with a single image is never held out. With 1-5 labels per class this turns every
    labelled image (but singletons) into a test case, instead of one or two in a single split.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    offset = 0
    for cls in sorted(set(labels.tolist()), key=str):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < 2:
            continue
        for j, i in enumerate(idx):  # round robin, rotated so small classes use every fold
            folds[(offset + j) % n_folds].append(int(i))
        offset += len(idx)
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of a proportion; (0, 1) when n = 0 (nothing known)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Held-out results; accuracies in percent, ``top1_ci`` the 95% Wilson interval of top-1."""

    n: int
    top1: float
    top5: float
    top1_ci: tuple[float, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    classes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line a user can read: accuracy, interval, size of the held-out set."""
        if self.n == 0:
            return "no held-out images: accuracy not estimated (label 2+ images per class)"
        lo, hi = self.top1_ci
        return (
            f"top-1 {self.top1:.1f}% (95% CI {lo:.1f}-{hi:.1f}%, {self.n} held-out images), "
            f"top-5 {self.top5:.1f}%"
        )


def classification_metrics(
    scores: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> ClassificationMetrics:
    """Top-1/top-5, per-class accuracy and confusion matrix of ``scores`` (NxC) against labels.

    ``confusion[i][j]`` counts images of true class i predicted as class j.
    """
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=np.int64)
    c = len(classes)
    n = len(labels)
    if n == 0:
        return ClassificationMetrics(
            0,
            float("nan"),
            float("nan"),
            (0.0, 100.0),
            {},
            np.zeros((c, c), dtype=int).tolist(),
            list(classes),
        )
    order = np.argsort(-scores, axis=1, kind="stable")
    pred = order[:, 0]
    hit1 = pred == labels
    hit5 = (order[:, : min(5, c)] == labels[:, None]).any(axis=1)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        m = int(confusion[i].sum())
        if m:
            per_class[name] = {"accuracy": 100.0 * confusion[i, i] / m, "n": m}
    lo, hi = wilson_interval(int(hit1.sum()), n)
    return ClassificationMetrics(
        n,
        100.0 * hit1.mean(),
        100.0 * hit5.mean(),
        (100.0 * lo, 100.0 * hi),
        per_class,
        confusion.tolist(),
        list(classes),
    )


def save_confusion_png(
    confusion: Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Row-normalised confusion matrix as a PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * len(classes), 30)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=90, fontsize=7)
    ax.set_yticks(ticks, labels=list(classes), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 20:
        for i, j in zip(*np.nonzero(cm), strict=True):
            ax.text(
                j,
                i,
                str(int(cm[i, j])),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rows[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def retrieval_metrics(
    sim: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """mAP@max(ks) and recall@k (percent) of a QxG similarity matrix; same label = relevant.

    recall@k: share of queries with at least one relevant image in their top k.
    AP@k: ``sum_i P@i * rel_i / min(k, R)`` over the top k, R the number of relevant gallery
    images. Queries without any relevant image are left out.
    """
    sim = np.asarray(sim)
    q_lab, g_lab = np.asarray(query_labels), np.asarray(gallery_labels)
    kmax = min(max(ks), sim.shape[1])
    top = np.argsort(-sim, axis=1, kind="stable")[:, :kmax]  # Qxk
    rel = g_lab[top] == q_lab[:, None]  # Qxk
    n_rel = (g_lab[None, :] == q_lab[:, None]).sum(axis=1)  # Q
    keep = n_rel > 0
    out: dict[str, float] = {"queries": int(keep.sum())}
    if not keep.any():
        return out | {f"recall@{k}": float("nan") for k in ks} | {f"mAP@{max(ks)}": float("nan")}
    rel, n_rel = rel[keep], n_rel[keep]
    for k in ks:
        out[f"recall@{k}"] = 100.0 * rel[:, :k].any(axis=1).mean()
    precision = np.cumsum(rel, axis=1) / np.arange(1, kmax + 1)  # P@i
    ap = (precision * rel).sum(axis=1) / np.minimum(kmax, n_rel)
    out[f"mAP@{max(ks)}"] = 100.0 * ap.mean()
    return out
