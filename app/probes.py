"""Probes the UI trains: on given image ids with a held-out set, or cross-validated.

``indexes.classify.train_collection_probe`` trains on every label the indexer stored. The UI
also needs two other cases: the demo's fixed train/val split (accuracy on the val images only),
and a handful of labels typed into the UI. Both train the same linear layer on stored vectors
and save it where ``indexes.classify`` reads probes, so ``Classifier`` uses them unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from indexes import Collection
from indexes.classify import probe_dir
from moco.metrics import (
    ClassificationMetrics,
    classification_metrics,
    save_confusion_png,
    stratified_folds,
)
from moco.probe import ProbeConfig, save_probe, train_probe

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class ProbeResult:
    """A saved probe, its held-out metrics and the confusion matrix image."""

    name: str
    path: Path
    classes: list[str]
    n_train: int
    method: str
    metrics: ClassificationMetrics
    confusion_png: Path | None
    seconds: float

    def line(self) -> str:
        """One plain line (the terminal's log)."""
        return (f"probe {self.name}: {len(self.classes)} classes, {self.n_train} labelled "
                f"images; {self.metrics.summary()} ({self.method}; trained in "
                f"{self.seconds:.1f} s)")

    def markdown(self) -> str:
        """The same line for the UI, the probe's name set off."""
        return f"**Probe `{self.name}`**" + self.line().removeprefix(f"probe {self.name}")


def _scores(x: np.ndarray, y: np.ndarray, classes: list[str], cfg: ProbeConfig,
            train: np.ndarray, test: np.ndarray) -> np.ndarray:
    probe = train_probe(x[train], y[train], cfg, classes=classes)
    with torch.inference_mode():
        return probe(torch.from_numpy(x[test])).numpy()


def train_on_ids(col: Collection, ids: Sequence[int], labels: Sequence[str], *, name: str,
                 heldout: tuple[Sequence[int], Sequence[str]] | None = None, folds: int = 5,
                 progress: Progress | None = None) -> ProbeResult:
    """Train and save probe ``name`` on the stored vectors of ``ids``.

    Accuracy comes from ``heldout`` (ids, labels) when given (the demo's val split), else from
    ``folds``-fold cross-validation over the given labels (every image predicted once by a probe
    that did not see it), as few labels are all a user typing them in will have.
    """
    t0 = time.perf_counter()
    say = progress or (lambda f, m: None)
    classes = sorted(set(labels) | set(heldout[1] if heldout else []))
    if len(set(labels)) < 2:
        raise ValueError(f"A probe needs labelled images of at least 2 classes; got "
                         f"{len(ids)} images of {len(set(labels))} class(es)")
    cfg = ProbeConfig.fast()
    x = col.vectors(list(ids))
    y = np.array([classes.index(v) for v in labels], dtype=np.int64)
    say(0.1, "measuring held-out accuracy")
    if heldout is not None and len(heldout[0]):
        xv = col.vectors(list(heldout[0]))
        yv = np.array([classes.index(v) for v in heldout[1]], dtype=np.int64)
        x_all, y_all = np.concatenate([x, xv]), np.concatenate([y, yv])
        tr, te = np.arange(len(y)), np.arange(len(y), len(y_all))
        scores, truth = _scores(x_all, y_all, classes, cfg, tr, te), yv
        method = "the fixed held-out split"
    else:
        held = [f for f in stratified_folds(y, folds) if len(f)]
        parts, truths = [], []
        for j, te in enumerate(held):
            say(0.1 + 0.7 * j / max(1, len(held)), f"cross-validation fold {j + 1}/{len(held)}")
            tr = np.setdiff1d(np.arange(len(y)), te)
            parts.append(_scores(x, y, classes, cfg, tr, te))
            truths.append(y[te])
        scores = np.concatenate(parts) if parts else np.zeros((0, len(classes)), np.float32)
        truth = np.concatenate(truths) if truths else np.zeros(0, np.int64)
        method = f"{folds}-fold cross-validation"
    metrics = classification_metrics(scores, truth, classes)
    say(0.85, "training on all labels")
    probe = train_probe(x, y, cfg, classes=classes,
                        encoder_hash=str(col.manifest["encoder"]["content_hash"]))
    out = probe_dir(col, name)
    save_probe(probe, out, cfg=cfg, metrics={**metrics.to_dict(), "method": method,
                                             "n_labeled": len(ids)})
    png = save_confusion_png(metrics.confusion, classes, out / "confusion.png",
                             title=f"{name}: held-out confusion ({metrics.n} images)"
                             ) if metrics.n else None
    say(1.0, "saved")
    return ProbeResult(name, out, classes, len(ids), method, metrics, png,
                       round(time.perf_counter() - t0, 2))
