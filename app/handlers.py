"""Search handlers: plain functions from UI values to display values, testable without a server.

Every user mistake (an upload that is not an image, a bad filter, a k out of range) raises
``UserError`` with a sentence the UI shows as is; ``app.ui`` turns it into ``gr.Error``. Image
files reach the browser only through ``safe_path``, which refuses anything that resolves outside
the collection's roots (``../``, absolute paths elsewhere, symlinks out).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from app.context import AppContext
from app.thumbnails import thumbnail
from indexes import Filters, Hit
from moco import ImageError, load_image

MAX_K = 100
MAX_UPLOAD_PIXELS = 40_000_000
"""Uploads above this many pixels are refused as decompression bombs (a 40-megapixel photo)."""


class UserError(ValueError):
    """A mistake the user can fix; its message is shown in the UI."""


@dataclass(frozen=True)
class SearchResult:
    """What one search shows: gallery items, the hits behind them, and how long it took."""

    gallery: list[tuple[str, str]]
    hits: list[Hit]
    seconds: float

    def status(self) -> str:
        return f"{len(self.hits)} results in {1000 * self.seconds:.0f} ms"

    def rows(self) -> list[dict[str, Any]]:
        """JSON-friendly hit rows (what the API and the downloads return)."""
        return [{"rank": i + 1, "id": h.id, "score": round(h.score, 4), "label": h.label,
                 "path": h.path, "relpath": h.relpath} for i, h in enumerate(self.hits)]


def decode_upload(image: Any) -> Image.Image:
    """An uploaded file path (or PIL image) decoded with ``moco.load_image``, or a clear error."""
    if image is None or (isinstance(image, str) and not image):
        raise UserError("Upload, paste or drop an image first (or click an example).")
    try:
        return load_image(image, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageError as e:
        raise UserError(f"Cannot use this upload: {e.reason} ({e})") from e


def make_filters(label: str | None, path_text: str | None) -> Filters | None:
    """Filters from the UI: a label (``""``/"(any)" = none) and a path substring or glob."""
    label = (label or "").strip()
    label = None if label in ("", "(any)") else label
    text = (path_text or "").strip()
    if len(text) > 200:
        raise UserError("The path filter is too long (200 characters at most).")
    glob = None
    if text:
        glob = text if any(c in text for c in "*?[") else f"*{text}*"
    f = Filters(label=label, path_glob=glob)
    return None if f.is_empty() else f


def check_k(k: Any) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError) as e:
        raise UserError(f"k must be a whole number, got {k!r}") from e
    if not 1 <= k <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def safe_path(ctx: AppContext, path: str) -> str | None:
    """``path`` if it resolves (symlinks followed) inside one of the served roots, else None."""
    real = os.path.realpath(path)
    for root in ctx.allowed_paths:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    return None


def caption(hit: Hit) -> str:
    label = f" · {hit.label}" if hit.label else ""
    return f"{hit.score:.3f}{label} · {hit.relpath}"


def to_result(ctx: AppContext, hits: list[Hit], seconds: float) -> SearchResult:
    """Hits whose file may be served, as gallery items; others are dropped, never served."""
    shown = [(h, p) for h in hits if (p := safe_path(ctx, h.path)) is not None]
    tiles = [(thumbnail(ctx.path, p, h.meta.get("sha256"), h.meta.get("width"),
                        h.meta.get("height")), caption(h)) for h, p in shown]
    return SearchResult(tiles, [h for h, _ in shown], seconds)


def search(ctx: AppContext, image: Any, k: Any = 12, label: str | None = None,
           path_text: str | None = None, min_score: float | None = None,
           positives: Sequence[int] = (), negatives: Sequence[int] = ()) -> SearchResult:
    """Top-k images like ``image`` (an upload), refined by example ids (relevance feedback)."""
    k = check_k(k)
    filters = make_filters(label, path_text)
    query: list[Any] = [decode_upload(image)] if image is not None else []
    query += [int(i) for i in positives]
    if not query:
        raise UserError("Upload, paste or drop an image first (or click an example).")
    cut = None if min_score is None or float(min_score) <= -1 else float(min_score)
    t0 = time.perf_counter()
    try:
        hits = ctx.collection.search(query, k=k, negatives=[int(i) for i in negatives],
                                     filters=filters, min_score=cut)
    except ValueError as e:  # e.g. positives and negatives cancel out
        raise UserError(str(e)) from e
    return to_result(ctx, hits, time.perf_counter() - t0)


def search_id(ctx: AppContext, image_id: int, k: Any = 12, label: str | None = None,
              path_text: str | None = None, min_score: float | None = None) -> SearchResult:
    """"More like this": the neighbours of an indexed image, itself first."""
    k = check_k(k)
    t0 = time.perf_counter()
    vec = ctx.collection.vectors([int(image_id)])[0]
    cut = None if min_score is None or float(min_score) <= -1 else float(min_score)
    hits = ctx.collection.search_vector(vec, k, filters=make_filters(label, path_text),
                                        min_score=cut)
    return to_result(ctx, hits, time.perf_counter() - t0)


def selected_hit(hits: Sequence[dict[str, Any]] | None, index: Any) -> dict[str, Any]:
    """The hit row behind a clicked gallery item (``SelectData.index``)."""
    if not hits:
        raise UserError("Run a search first.")
    i = int(index[0] if isinstance(index, (list, tuple)) else index)
    if not 0 <= i < len(hits):
        raise UserError(f"No result number {i + 1}")
    return dict(hits[i])


def toggle(ids: Sequence[int], image_id: int, others: Sequence[int]) -> tuple[list[int],
                                                                            list[int]]:
    """Add ``image_id`` to one feedback list (removing it from the other); again removes it."""
    ids, others = [int(i) for i in ids], [int(i) for i in others if int(i) != int(image_id)]
    ids = [i for i in ids if i != int(image_id)] if int(image_id) in ids else [*ids,
                                                                             int(image_id)]
    return ids, others


def feedback_text(positives: Sequence[int], negatives: Sequence[int]) -> str:
    if not positives and not negatives:
        return "No examples yet: select a result, then mark it as more or less like this."
    return f"More like: {list(positives) or '-'} · Less like: {list(negatives) or '-'}"


def export(rows: Sequence[dict[str, Any]] | None, fmt: str) -> str:
    """Write the shown results to a CSV or JSON file in a fresh temp dir; return its path."""
    if not rows:
        raise UserError("Nothing to download yet: run a search first.")
    if fmt not in ("csv", "json"):
        raise UserError(f"Unknown format {fmt!r}; use csv or json")
    out = Path(tempfile.mkdtemp(prefix="moco-search-")) / f"results.{fmt}"
    if fmt == "json":
        out.write_text(json.dumps(list(rows), indent=1))
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        out.write_text(buf.getvalue())
    return str(out)


