"""Classifying a collection: a linear probe on its stored vectors, or kNN without training.

The collection already holds one embedding per image, so training a probe costs only the linear
layer: seconds for tens of thousands of images. Labels come from the collection's metadata
(folder names or a labels CSV given at index time).

How good is it? With many labels, a stratified held-out split says so. With few (1-5 per class),
one split would test one or two images, so small label sets are cross-validated instead: every
labelled image of a class with 2+ images is predicted once by a probe that did not see it. The
result carries the number of test images and a 95% Wilson interval, and the probe that is saved
is then retrained on every label.

Layout inside the collection:
    probes/<name>/probe.safetensors, probe.json   the probe, its classes, encoder hash, metrics
    probes/<name>/confusion.png                   the held-out confusion matrix
    meta.db, table ``predictions`` (indexes.store) ``classify_all``'s label + confidence per image
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexes.collection import Collection
from indexes.faults import not_writable
from indexes.manifest import MANIFEST_NAME
from indexes.probes import DEFAULT_PROBE, PROBES_DIR, probe_dir
from moco import (
    KNN_K,
    KNN_T,
    ClassificationMetrics,
    LinearProbe,
    ProbeConfig,
    classification_metrics,
    knn_predict,
    load_probe,
    save_confusion_png,
    save_probe,
    stratified_folds,
    stratified_split,
)
from moco import train_probe as fit_probe

log = logging.getLogger(__name__)

CV_MAX_LABELS = 2000
"""Up to this many labelled images, accuracy is cross-validated rather than split once."""


def _open(collection: Collection | str | os.PathLike) -> Collection:
    return collection if isinstance(collection, Collection) else Collection.open(collection)


def _check_writable(col: Collection, what: str) -> None:
    """Refuse up front on a read-only collection (it can be searched, not written)."""
    why = not_writable(col.path, ("meta.db", PROBES_DIR))
    if why:
        raise PermissionError(
            f"Collection {col.path} is not writable ({why}): cannot {what}; nothing was changed"
        )


def _encoder_hash(col: Collection) -> str:
    return str(col.manifest["encoder"]["content_hash"])


Progress = Callable[[float, str], None]
"""Called with (fraction done, what is being done): the UI's progress bar."""


@dataclass(frozen=True)
class ProbeReport:
    """What ``train_probe`` did and how reliable its accuracy estimate is."""

    name: str
    path: Path
    classes: list[str]
    n_labeled: int
    method: str
    metrics: ClassificationMetrics
    confusion_png: Path | None
    seconds: float

    def majority(self) -> tuple[str, float] | None:
        """The most common label among the test images and the accuracy of always guessing it:
        the bar a probe must clear before its accuracy means anything."""
        counts = {c: pc["n"] for c, pc in self.metrics.per_class.items() if pc["n"]}
        if not counts:
            return None
        top = max(sorted(counts), key=counts.__getitem__)
        return top, 100.0 * counts[top] / sum(counts.values())

    def _majority_text(self) -> str:
        m = self.majority()
        return f"; always guessing {m[0]!r}: {m[1]:.1f}%" if m else ""

    def line(self) -> str:
        """One plain line: the terminal's log."""
        return (
            f"probe {self.name}: {len(self.classes)} classes, {self.n_labeled} labelled "
            f"images; {self.metrics.summary()}{self._majority_text()} ({self.method}; trained "
            f"in {self.seconds:.1f} s)"
        )

    def summary(self) -> str:
        """Several lines for ``probe train``: the estimate, how firm it is, each class."""
        lines = [
            f"probe {self.name!r}: {len(self.classes)} classes, {self.n_labeled} labelled "
            f"images; accuracy by {self.method}",
            "  " + self.metrics.summary(),
        ]
        if (m := self.majority()) is not None:
            lines.append(f"  always guessing the most common label ({m[0]}) scores {m[1]:.1f}%")
        if self.metrics.n and self.metrics.n < 30:
            lines.append(
                f"  only {self.metrics.n} test images: the interval is wide; label "
                "more images for a firmer estimate"
            )
        for cls, pc in sorted(self.metrics.per_class.items()):
            lines.append(f"  {cls}: {pc['accuracy']:.0f}% of {int(pc['n'])}")
        tested = {c for c, pc in self.metrics.per_class.items() if pc["n"]}
        if self.metrics.n and (untested := [c for c in self.classes if c not in tested]):
            lines.append(  # its accuracy above says nothing of it
                f"  never tested: {', '.join(untested)} (too few labelled images to hold one "
                "out; label more of each)"
            )
        lines.append(f"saved to {self.path} ({self.seconds:.1f}s)")
        return "\n".join(lines)


def _heldout_scores(
    x: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    cfg: ProbeConfig,
    val_fraction: float,
    folds: int,
    seed: int,
    say: Progress,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Scores of held-out images by probes that never saw them, their labels, and the method."""
    if len(y) <= CV_MAX_LABELS and folds >= 2:
        held = [f for f in stratified_folds(y, folds, seed=seed) if len(f)]
        method = f"{folds}-fold cross-validation"
    else:
        held = [stratified_split(y, val_fraction, seed=seed)[1]]
        method = f"a stratified {val_fraction:.0%} held-out split"
    scores, truth = [], []
    for j, va in enumerate(held):
        say(0.1 + 0.7 * j / len(held), f"held-out accuracy: part {j + 1} of {len(held)}")
        mask = np.ones(len(y), dtype=bool)
        mask[va] = False
        scores.append(_scores(fit_probe(x[mask], y[mask], cfg, classes=classes), x[va]))
        truth.append(y[va])
    if not scores:
        return np.zeros((0, len(classes)), np.float32), np.zeros(0, np.int64), method
    return np.concatenate(scores), np.concatenate(truth), method


def _scores(probe: LinearProbe, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return probe(torch.from_numpy(x)).numpy()


def train_probe(
    collection: Collection | str | os.PathLike,
    ids: Sequence[int],
    labels: Sequence[str],
    *,
    name: str = DEFAULT_PROBE,
    heldout: tuple[Sequence[int], Sequence[str]] | None = None,
    cfg: ProbeConfig | None = None,
    val_fraction: float = 0.2,
    folds: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
) -> ProbeReport:
    """Train, measure and save probe ``name`` on the stored vectors of ``ids``: the one way
    probes are made (``probe train``, the UI's labels, the demo's fixed split).

    Accuracy comes from ``heldout`` (ids, labels) when given; else up to ``CV_MAX_LABELS``
    labels are cross-validated over ``folds`` (every image predicted once by a probe that did not
    see it: few labels are all a user typing them in will have) and more are split once
    (``val_fraction``). The probe saved is then trained on every given label.
    """
    if folds < 0 or folds == 1:  # both made one split in silence
        raise ValueError(f"--folds must be 0 (one split) or 2 or more, got {folds}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    t0 = time.perf_counter()
    say = progress or (lambda f, m: None)
    col = _open(collection)
    _check_writable(col, "store a probe")
    out = probe_dir(col, name)
    cfg = cfg or ProbeConfig.fast()
    classes = sorted(set(labels) | set(heldout[1] if heldout else ()))
    if len(set(labels)) < 2:
        raise ValueError(
            f"A classifier needs labelled images of at least 2 classes; got {len(ids)} "
            f"labelled images in {len(set(labels))} class(es). Label images by folder "
            "(ROOT/CLASS/IMAGE) or with `index --labels CSV`"
        )
    x = col.vectors(list(ids))
    y = np.array([classes.index(v) for v in labels], dtype=np.int64)
    if heldout is not None and len(heldout[0]):
        say(0.1, "held-out accuracy")
        probe = fit_probe(x, y, cfg, classes=classes)
        scores, method = _scores(probe, col.vectors(list(heldout[0]))), "the fixed held-out split"
        truth = np.array([classes.index(v) for v in heldout[1]], dtype=np.int64)
    else:
        scores, truth, method = _heldout_scores(x, y, classes, cfg, val_fraction, folds, seed, say)
    metrics = classification_metrics(scores, truth, classes)
    say(0.85, "training on every label")
    probe = fit_probe(x, y, cfg, classes=classes, encoder_hash=_encoder_hash(col))
    if not (col.path / MANIFEST_NAME).is_file():  # save_probe would make its folder anew
        raise FileNotFoundError(
            f"Collection {col.path} is gone (deleted or moved since it was opened): the probe "
            "was not saved"
        )
    save_probe(
        probe, out, cfg=cfg, metrics={**metrics.to_dict(), "method": method, "n_labeled": len(ids)}
    )
    png = (
        save_confusion_png(
            metrics.confusion,
            classes,
            out / "confusion.png",
            title=f"{name}: held-out confusion ({metrics.n} images)",
        )
        if metrics.n
        else None
    )
    say(1.0, "saved")
    return ProbeReport(
        name, out, classes, len(ids), method, metrics, png, round(time.perf_counter() - t0, 2)
    )


def train_collection_probe(
    collection: Collection | str | os.PathLike, *, name: str = DEFAULT_PROBE, **kwargs: Any
) -> ProbeReport:
    """``train_probe`` on every label the indexer stored (folder names or ``--labels``)."""
    col = _open(collection)
    ids, labels = col.labeled()
    if len(set(labels)) < 2:
        raise ValueError(
            f"A classifier needs labelled images of at least 2 classes; {col.path} has "
            f"{len(ids)} labelled images in {len(set(labels))} class(es). Label images by folder "
            "(ROOT/CLASS/IMAGE) or with `index --labels CSV`"
        )
    return train_probe(col, [int(i) for i in ids], labels, name=name, **kwargs)


@dataclass(frozen=True)
class Prediction:
    """Top-k labels of one image with their probabilities (probe) or vote shares (kNN)."""

    source: str
    labels: list[str]
    probs: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.source,
            "top": [
                {"label": lab, "p": round(p, 4)}
                for lab, p in zip(self.labels, self.probs, strict=True)
            ],
        }


class Classifier:
    """A probe or the kNN vote over a collection's labelled vectors, applied to unit vectors."""

    def __init__(
        self,
        col: Collection,
        name: str = DEFAULT_PROBE,
        knn: bool = False,
        knn_k: int = KNN_K,
        T: float = KNN_T,
    ) -> None:
        if knn and (knn_k < 1 or T <= 0):  # k=0 left every prediction empty
            raise ValueError(f"--knn-k must be 1 or more and --knn-t above 0, got {knn_k}, {T}")
        self.method = f"knn(k={knn_k},T={T})" if knn else f"probe:{name}"
        self.knn_k, self.T = knn_k, T
        self.probe: LinearProbe | None = None
        if knn:
            ids, labels = col.labeled()
            if not ids.size:
                raise ValueError(f"kNN needs labelled images; {col.path} has none")
            self.classes = sorted(set(labels))
            self.bank = col.vectors(ids)
            self.bank_y = np.array([self.classes.index(v) for v in labels], dtype=np.int64)
        else:
            path = probe_dir(col, name)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"No probe {name!r} in {col.path}: run `probe train "
                    f"--collection {col.path}` first, or use --knn"
                )
            self.probe = load_probe(path, encoder_hash=_encoder_hash(col))
            self.classes = self.probe.classes

    def probabilities(self, vecs: np.ndarray) -> np.ndarray:
        """NxC: softmax of the probe, or each class's share of the kNN votes."""
        if self.probe is not None:
            with torch.inference_mode():
                return self.probe(torch.from_numpy(vecs)).softmax(1).numpy()
        votes = knn_predict(
            self.bank, self.bank_y, vecs, len(self.classes), k=self.knn_k, T=self.T
        ).numpy()
        return votes / np.maximum(votes.sum(1, keepdims=True), 1e-30)

    def top(self, vecs: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        probs = self.probabilities(vecs)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(probs, order, axis=1)


def predict_images(
    collection: Collection | str | os.PathLike,
    images: Sequence[Any],
    *,
    name: str = DEFAULT_PROBE,
    knn: bool = False,
    k: int = 5,
    knn_k: int = KNN_K,
    T: float = KNN_T,
) -> list[Prediction]:
    """Top-``k`` labels of image files (or bytes, PIL images) embedded as the collection's."""
    col = _open(collection)
    clf = Classifier(col, name=name, knn=knn, knn_k=knn_k, T=T)
    order, probs = clf.top(col.embed(list(images)), k=k)
    return [
        Prediction(
            str(src) if not isinstance(src, bytes) else "<bytes>",
            [clf.classes[j] for j in o],
            [float(p) for p in pr],
        )
        for src, o, pr in zip(images, order, probs, strict=True)
    ]


@dataclass(frozen=True)
class ClassifyReport:
    """How many unlabelled images ``classify_all`` labelled, and how."""

    n: int
    method: str
    counts: dict[str, int]
    low_confidence: int
    seconds: float

    def summary(self) -> str:
        top = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return (
            f"classified {self.n} unlabelled images with {self.method} in "
            f"{self.seconds:.1f}s ({self.low_confidence} below 50% confidence)\n  {top}"
        )


def classify_all(
    collection: Collection | str | os.PathLike,
    *,
    name: str = DEFAULT_PROBE,
    knn: bool = False,
    knn_k: int = KNN_K,
    T: float = KNN_T,
    chunk: int = 4096,
) -> ClassifyReport:
    """Predict every unlabelled indexed image; store label, confidence and top-5 in ``meta.db``.

    The ``predictions`` table is replaced as a whole, so it always reflects one classifier.
    """
    t0 = time.perf_counter()
    col = _open(collection)
    _check_writable(col, "store predictions")
    clf = Classifier(col, name=name, knn=knn, knn_k=knn_k, T=T)
    given = col.user_labels()
    ids = [
        r.id
        for r in col.query_records("images.status = 'ok' AND images.label IS NULL")
        if r.id not in given
    ]
    rows: list[tuple[Any, ...]] = []
    now = time.time()
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        order, probs = clf.top(col.vectors(part), k=5)
        for i, o, p in zip(part, order, probs, strict=True):
            top5 = json.dumps(
                [[clf.classes[j], round(float(q), 4)] for j, q in zip(o, p, strict=True)]
            )
            rows.append(
                (i, clf.classes[o[0]], float(p[0]), top5, clf.method, _encoder_hash(col), now)
            )
    col.replace_predictions(rows)
    counts = Counter(r[1] for r in rows)
    return ClassifyReport(
        len(rows),
        clf.method,
        dict(counts),
        sum(r[2] < 0.5 for r in rows),
        round(time.perf_counter() - t0, 2),
    )


def read_predictions(
    collection: Collection | str | os.PathLike, ids: Sequence[int] | None = None
) -> dict[int, dict[str, Any]]:
    """Stored predictions by image id (label, confidence, top5, method) of images still indexed."""
    rows = _open(collection).predictions()
    wanted = None if ids is None else {int(i) for i in ids}
    return {
        r[0]: {"label": r[1], "confidence": r[2], "top5": json.loads(r[3]), "method": r[4]}
        for r in rows
        if wanted is None or r[0] in wanted
    }
