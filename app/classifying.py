"""Classify-tab handlers: top-5 labels of a query, training probes, labelling from the gallery.

The classifier is the collection's linear probe when one is trained (``default`` from the
indexer's labels, ``ui`` from labels given here), otherwise the kNN vote over the labelled
stored vectors, which needs no training at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.context import USER_PROBE, AppContext
from app.handlers import GONE, UserError, decode_upload
from app.markup import code, md
from indexes import Hit
from indexes.probes import DEFAULT_PROBE, list_probes

if TYPE_CHECKING:
    from indexes.classify import ProbeReport

KNN = "knn"
Progress = Callable[[float, str], None]


def methods(ctx: AppContext) -> list[str]:
    """Classifiers on offer: the saved probes (best first), then kNN when labels exist."""
    names = sorted(list_probes(ctx.collection), key=lambda n: (n != DEFAULT_PROBE, n))
    if ctx.collection.label_counts():
        names.append(KNN)
    return names


def default_method(ctx: AppContext, found: list[str] | None = None) -> str | None:
    """The classifier shown first; ``found``: ``methods(ctx)`` when the caller has it already."""
    found = methods(ctx) if found is None else found
    return found[0] if found else None


def classify(
    ctx: AppContext, image: Any, method: str | None = None, k: int = 5
) -> tuple[dict[str, float], str]:
    """Top-``k`` labels with probabilities (probe) or vote shares (kNN), and a caption."""
    method = method or default_method(ctx)
    if method is None:
        raise UserError(
            "No labels yet: label a few images below (or index folders named by class) to classify."
        )
    if method not in methods(ctx):
        raise UserError(f"Unknown classifier {method!r}; available: {methods(ctx)}")
    vec = ctx.collection.embed([decode_upload(ctx, image)])
    try:
        clf = ctx.classifier(method)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    order, probs = clf.top(vec, k=k)
    top = {clf.classes[j]: float(p) for j, p in zip(order[0], probs[0], strict=True)}
    if method == KNN:
        return top, f"By a kNN vote among the labelled images ({len(clf.classes)} classes)."
    return top, f"By the linear probe {code(method)} ({len(clf.classes)} classes)."


def probe_summary(ctx: AppContext, name: str | None) -> tuple[str, str | None]:
    """The saved accuracy and confusion-matrix image of probe ``name``."""
    probes = list_probes(ctx.collection)
    if not name or name not in probes:
        return "No probe trained yet: classification uses the kNN vote.", None
    m = probes[name].get("metrics", {})
    how = re.sub(r" \(\d+ images\)$", "", m.get("method", "?"))  # older probes said it twice
    png = ctx.path / "probes" / name / "confusion.png"
    acc = (
        (
            f"top-1 {m['top1']:.1f}% (95% CI {m['top1_ci'][0]:.1f}-{m['top1_ci'][1]:.1f}%) on "
            f"{m['n']} held-out images ({how})"
        )
        if m.get("n")
        else "no held-out estimate"
    )
    return (
        f"**Probe {code(name)}**: {len(probes[name].get('classes', []))} classes, "
        f"{m.get('n_labeled', '?')} labelled images; {acc}.",
        str(png) if png.is_file() else None,
    )


def trained_markdown(report: ProbeReport) -> str:
    """``ProbeReport.line`` for the page, the probe's name set off (the line names a label)."""
    return f"**Probe {code(report.name)}**" + md(report.line().removeprefix(f"probe {report.name}"))


def train(ctx: AppContext, source: str, progress: Progress | None = None) -> ProbeReport:
    """Train (or retrain) a probe on the indexer's labels (``default``) or the UI's (``ui``)."""
    from indexes.classify import train_probe  # torch: not needed to serve the page

    if source == DEFAULT_PROBE:
        ids, labels = ctx.collection.labeled()
        ids = [int(i) for i in ids]
    elif source == USER_PROBE:
        given = ctx.user_labels()
        ids, labels = list(given), list(given.values())
    else:
        raise UserError(f"Unknown label source {source!r}; use {DEFAULT_PROBE!r} or {USER_PROBE!r}")
    if len(set(labels)) < 2:
        raise UserError(
            "A probe needs labelled images of at least 2 classes. " + hint(labels, source)
        )
    try:
        result = train_probe(ctx.collection, ids, labels, name=source, progress=progress)
    except (PermissionError, FileNotFoundError) as e:  # a read-only collection, or one gone
        raise UserError(str(e)) from e
    ctx.forget_classifiers()
    return result


def tally(labels: list[str]) -> str:
    """``cats: 3, dogs: 1``, or ``none``."""
    counts: dict[str, int] = {}
    for v in labels:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"


def hint(labels: list[str], source: str) -> str:
    """What there is to train on so far, and how to give more labels."""
    so_far = tally(labels)
    if source == USER_PROBE:
        return (
            f"Labels given here so far: {so_far}. Select a search result and label it below, "
            "for images of at least two kinds."
        )
    return (
        f"Labels from the indexed folders: {so_far}. Index images in folders named by class "
        "(cats/, dogs/), or give labels here and train on them."
    )


def label_image(ctx: AppContext, hit: Hit | None, label: str | None) -> str:
    """Give the selected result (the server's own ``Hit``) a label (empty removes it); report
    the labels so far."""
    if not hit:
        raise UserError("Select a result in the Search tab's gallery first.")
    label = (label or "").strip()
    if len(label) > 64 or any(c in label for c in "\n\r\t"):
        raise UserError("Labels are one line of at most 64 characters.")
    try:
        labels = ctx.set_user_label(hit.id, label or None)
    except ValueError as e:  # "No image with id ...": removed by an index run since
        raise UserError(GONE) from e
    name = md(Path(hit.relpath or str(hit.id)).name)
    done = f"labelled {name} as **{md(label)}**" if label else f"removed the label of {name}"
    return f"{done}. Labels given here: {md(tally(list(labels.values())))}."
