"""Collection-tab handlers: counts, label histogram, errors, duplicates and a 2-D map.

The map is a PCA projection of the stored vectors drawn with PIL into a fixed canvas, so a click
on the image (pixel coordinates from Gradio's select event) maps straight back to the nearest
point: no plotting library in the loop, and testable as plain arithmetic.
"""

from __future__ import annotations

import base64
import colorsys
import io
import os
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from app.context import AppContext
from app.markup import code, md
from indexes.duplicates import THRESHOLD

MAP_W, MAP_H, MARGIN, LEGEND_W = 720, 520, 24, 170
MAP_MAX_POINTS = 5000
"""The map draws a random sample of at most this many images (deterministic seed)."""


def heading(ctx: AppContext) -> str:
    return f"## moco-search · {md(ctx.title)} · {len(ctx.collection)} images"


def stats_markdown(ctx: AppContext) -> str:
    m = ctx.collection.manifest
    counts = m.get("counts", {})
    roots = "\n".join(f"- {code(r)}{_gone(ctx, r)}" for r in m.get("roots", []))
    labels = ctx.collection.label_counts()
    copies, errors = counts.get("duplicate", 0), counts.get("error", 0)
    return (
        f"**{len(ctx.collection)} images indexed** ({copies} exact "
        f"cop{'y' if copies == 1 else 'ies'}, {errors} error{'' if errors == 1 else 's'}), "
        f"{len(labels)} labels, index "
        f"`{m.get('index', {}).get('factory', '?')}` (recall@10 "
        f"{m.get('index', {}).get('recall_at_10', '?')}), {m.get('feature_dim')}-d vectors.\n\n"
        f"Folders:\n{roots}"
    )


def _gone(ctx: AppContext, root: str) -> str:
    """`` (gone: ...)`` after a folder that is no longer there, with the command that follows a
    move; its images cannot be shown, and a re-scan is refused until then."""
    if os.path.isdir(root):
        return ""
    move = f"moco-search index --collection {ctx.path} --move-root {root} NEW_PLACE"
    return f" (gone; if it moved: {code(move)})"


def index_box_label(ctx: AppContext) -> str:
    """The folder box's label: which folders the UI may index (``--allow-index``)."""
    if not ctx.allow_index:
        return (
            "Refresh the collection's folders (leave empty). Adding folders here is off: "
            "start with --allow-index DIR to allow it"
        )
    return f"Add or refresh a folder under {', '.join(ctx.allow_index)} (empty: re-scan all)"


def label_histogram(ctx: AppContext) -> Any:
    import pandas as pd

    counts = ctx.collection.label_counts()
    return pd.DataFrame({"label": list(counts), "images": list(counts.values())})


def histogram_top(counts: Any) -> list[int]:
    """The histogram's y range, from 0 (Vega may start the axis above it) to above the
    tallest bar; recomputed after every index run, or a grown label is cut off."""
    return [0, int(counts["images"].max()) + 1 if len(counts) else 1]


def error_rows(ctx: AppContext, limit: int = 500) -> list[list[Any]]:
    return [[r.relpath, r.reason or "?", r.root] for r in ctx.collection.errors()[:limit]]


def duplicate_rows(
    ctx: AppContext, threshold: float = THRESHOLD, limit: int = 200
) -> list[list[Any]]:
    """One row per near-duplicate group: its size and the members' relative paths."""
    groups = ctx.collection.duplicates(threshold=float(threshold))[:limit]
    return [
        [len(g), f"{min(h.score for h in g):.3f}", " | ".join(h.relpath for h in g)] for g in groups
    ]


@dataclass(frozen=True)
class EmbeddingMap:
    """A drawn map: the image and, per point, its id and pixel position."""

    image: Image.Image
    ids: np.ndarray
    xy: np.ndarray  # N x 2 pixel coordinates
    names: tuple[str, ...] = ()  # per point, the file shown on hover (its relative path)

    def html(self) -> str:
        """The map for the page: the drawn PNG under one invisible SVG circle per point, whose
        title is the point's file (the browser shows it on hover). A click sends back only its
        coordinates (``MAP_JS``); the point is found here, so no id comes from the client."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        png = base64.b64encode(buf.getvalue()).decode("ascii")
        w, h = self.image.size
        dots = "".join(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="transparent">'
            f"<title>{escape(name)}</title></circle>"
            for (x, y), name in zip(self.xy, self.names, strict=True)
        )
        return (
            f'<svg class="embedding-map" viewBox="0 0 {w} {h}" width="100%" '
            f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="embedding map">'
            f'<image href="data:image/png;base64,{png}" width="{w}" height="{h}"/>{dots}</svg>'
        )

    def nearest(self, x: float, y: float, radius: float = 12.0) -> int | None:
        """The id of the point drawn closest to pixel (x, y), if within ``radius``."""
        if not len(self.ids):
            return None
        d = np.hypot(self.xy[:, 0] - x, self.xy[:, 1] - y)
        j = int(np.argmin(d))
        return int(self.ids[j]) if d[j] <= radius else None


MAP_JS = """
element.addEventListener('click', (e) => {
  const svg = element.querySelector('svg.embedding-map');
  if (!svg) return;
  const p = new DOMPoint(e.clientX, e.clientY).matrixTransform(svg.getScreenCTM().inverse());
  trigger('click', {x: p.x, y: p.y});
});
"""
"""The map's click: its position in the map's own pixels, for ``EmbeddingMap.nearest``."""

TAB20 = (
    "1f77b4",
    "ff7f0e",
    "2ca02c",
    "d62728",
    "9467bd",
    "8c564b",
    "e377c2",
    "7f7f7f",
    "bcbd22",
    "17becf",
    "aec7e8",
    "ffbb78",
    "98df8a",
    "ff9896",
    "c5b0d5",
    "c49c94",
    "f7b6d2",
    "c7c7c7",
    "dbdb8d",
    "9edae5",
)
"""Matplotlib's tab20 order: ten strong colours, then their light twins, so up to 20 labels stay
apart (evenly spaced hues run together beyond about eight)."""


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` label colours: tab20, then evenly spaced hues for labels beyond 20."""
    out = [tuple(int(h[i : i + 2], 16) for i in (0, 2, 4)) for h in TAB20[:n]]
    for i in range(n - len(out)):
        r, g, b = colorsys.hsv_to_rgb(i / max(n - len(TAB20), 1), 0.6, 0.75)
        out.append((int(255 * r), int(255 * g), int(255 * b)))
    return out  # type: ignore[return-value]


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of the rows of ``x`` (N x 2)."""
    x = x - x.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2), np.float32)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def embedding_map(ctx: AppContext, seed: int = 0) -> EmbeddingMap:
    """PCA of the stored vectors, coloured by label (grey: unlabelled), with a legend."""
    col = ctx.collection
    recs = col.query_records("images.status = 'ok'")
    rng = np.random.default_rng(seed)
    if len(recs) > MAP_MAX_POINTS:
        recs = [recs[j] for j in sorted(rng.choice(len(recs), MAP_MAX_POINTS, replace=False))]
    ids = np.array([r.id for r in recs], dtype=np.int64)
    labels = [r.label for r in recs]
    img = Image.new("RGB", (MAP_W + LEGEND_W, MAP_H), "white")
    draw = ImageDraw.Draw(img)
    if not len(ids):
        draw.text((MARGIN, MARGIN), "No images indexed yet.", fill="black")
        return EmbeddingMap(img, ids, np.zeros((0, 2)))
    p = pca_2d(col.vectors(ids))
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.where(hi - lo > 1e-9, hi - lo, 1.0)
    xy = np.empty_like(p)
    xy[:, 0] = MARGIN + (p[:, 0] - lo[0]) / span[0] * (MAP_W - 2 * MARGIN)
    xy[:, 1] = MAP_H - MARGIN - (p[:, 1] - lo[1]) / span[1] * (MAP_H - 2 * MARGIN)
    names = sorted({v for v in labels if v})
    colours = dict(zip(names, palette(len(names)), strict=True))
    for (x, y), lab in zip(xy, labels, strict=True):
        c = colours.get(lab, (160, 160, 160)) if lab else (160, 160, 160)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
    for i, name in enumerate(names[:40]):
        y = MARGIN + 16 * i
        draw.rectangle([MAP_W + 4, y, MAP_W + 14, y + 10], fill=colours[name])
        draw.text((MAP_W + 20, y - 2), name[:22], fill="black")
    draw.text((MARGIN, MAP_H - 14), "PCA of the embeddings (click a point)", fill="black")
    return EmbeddingMap(img, ids, xy, tuple(r.relpath for r in recs))
