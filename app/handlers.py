"""Search handlers: plain functions from UI values to display values, testable without a server.

Every user mistake (an upload that is not an image, a bad filter, a k out of range) raises
``UserError`` with a sentence the UI shows as is; ``app.ui`` turns it into ``gr.Error``. Images
reach the browser only as thumbnails of hits the server found itself (``AppContext.shown_file``);
no handler takes a path, record or hit list from the client.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from app.context import AppContext
from app.markup import code, md
from indexes import Filters, Hit
from moco import ImageError, decoder_hint, load_image

MAX_K = 100
MAX_UPLOAD_PIXELS = 40_000_000
"""Uploads that would decode to more pixels than this are refused as decompression bombs (a
JPEG is decoded at a reduced scale first, so only other formats of 40 MP and more are)."""
BROWSER_TYPES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".ico", ".avif"})
"""Image files that Chromium, Firefox and Safari all draw. Chromium and Firefox draw no HEIC (an
iPhone's photos) and no TIFF (a scanner's), which the search takes all the same."""
SHOWN_SIDE = 1280
"""The longest side of the picture the query box shows for an upload the browser cannot draw."""


class UserError(ValueError):
    """A mistake the user can fix; its message is shown in the UI."""


GONE = (
    "An image you picked is no longer in the collection (an index run removed it since): "
    "search again, and pick from the new results"
)


@contextmanager
def still_indexed() -> Iterator[None]:
    """Ids the page holds (a selected result, marked examples) that an index run has removed
    since: the collection's KeyError becomes a sentence (it showed as a bare "Error")."""
    try:
        yield
    except KeyError as e:
        raise UserError(GONE) from e


@dataclass(frozen=True)
class SearchResult:
    """What one search shows: gallery items, the hits behind them, and how long it took."""

    gallery: list[tuple[str, str]]
    hits: list[Hit]
    seconds: float
    why_none: str = ""
    """When nothing was found: why, in the user's terms (``none_found``)."""
    unshown: int = 0
    """Hits left out because their picture cannot be made now (``to_result``)."""

    def status(self) -> str:
        took = f"in {1000 * self.seconds:.0f} ms"
        if not self.hits and self.why_none:
            return f"No results {took}: {self.why_none}."
        found = f"{len(self.hits)} result{'' if len(self.hits) == 1 else 's'} {took}"
        if self.unshown:
            found += (
                f" ({self.unshown} more not shown: changed, moved or deleted since indexed; "
                "index the collection again)"
            )
        return found

    def position(self, hit: Hit | None) -> int | None:
        """Where ``hit`` is among these results (the gallery's selection frame follows it)."""
        if hit is None:
            return None
        return next((i for i, h in enumerate(self.hits) if h.id == hit.id), None)

    def rows(self) -> list[dict[str, Any]]:
        return hit_rows(self.hits)


def decode_upload(ctx: AppContext, image: Any) -> Image.Image:
    """An uploaded file path (or PIL image) decoded with ``moco.load_image``, or a clear error.

    Decoded as the indexer decodes files (a JPEG at a reduced scale, down to the encoder's input
    size), so an indexed photo uploaded again lands on its stored vector (decoded whole, six
    2000x1500 photos scored 0.99957 to 0.99997 against themselves on the demo encoder, one under
    ``QUERY_SCORE``), and a 48 or 108 MP phone photo is searchable:
    the pixel limit holds on what is decoded. The error names the file as the user knows it
    (Gradio keeps an upload's own file name, in a cache folder the user never saw) and the
    reason, once.
    """
    if image is None or (isinstance(image, str) and not image):
        raise UserError("Upload, paste or drop an image first (or click an example).")
    from indexes.embed import draft_size  # torch: loaded by ``warm`` after the page was served

    draft = draft_size(ctx.collection.encoder_config)
    try:
        return load_image(image, draft_size=draft, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageError as e:
        named = isinstance(image, (str, os.PathLike))
        name = Path(image).name if named else "this upload"
        detail = f" ({e.detail})" if e.detail and e.reason == "decompression bomb" else ""
        hint = decoder_hint(image) if named else ""
        raise UserError(f"Cannot use {name}: {e.reason}{detail}{hint}") from None


def for_browser(ctx: AppContext, image: Any) -> tuple[Any, Any]:
    """An upload as the search takes it and as the query box shows it, ``(searched, shown)``.

    A file the browser draws is both. Another (``BROWSER_TYPES``) is decoded once, searched
    whole, and shown as a picture of at most ``SHOWN_SIDE`` pixels, which Gradio saves into its
    upload cache as PNG: the box showed a broken picture beside the right results, and searching
    again searches that picture, close enough to the photo to find it first.
    """
    if not isinstance(image, (str, os.PathLike)) or Path(image).suffix.lower() in BROWSER_TYPES:
        return image, image
    searched = decode_upload(ctx, image)
    shown = searched.copy()
    shown.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
    return searched, shown


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


def check_cut(min_score: Any) -> float | None:
    """The similarity cut-off, None for none (-1 or less); NaN, which no score passes, or a
    value that is no number is refused."""
    if min_score is None:
        return None
    try:
        cut = float(min_score)
    except (TypeError, ValueError) as e:
        raise UserError(f"The similarity cut-off must be a number, got {min_score!r}") from e
    if math.isnan(cut):
        raise UserError("The similarity cut-off must be a number from -1 to 1, got nan")
    return None if cut <= -1 else cut


QUERY_SCORE = 0.9999
"""A hit this similar to the query is the query itself (or an exact copy of it)."""


def caption(hit: Hit, query_id: int | None = None) -> str:
    """``0.912 · circle_07.png``, with the label only where the folder does not already say it,
    and the query's own match marked as such. Short: the tile shows about 20 characters."""
    name = Path(hit.relpath).name
    folder = Path(hit.relpath).parent.name
    label = f" · {hit.label}" if hit.label and hit.label != folder else ""
    if hit.id == query_id or (query_id is None and hit.score >= QUERY_SCORE):
        return f"query · {name}{label}"
    return f"{hit.score:.3f} · {name}{label}"


def none_found(
    ctx: AppContext, found: int, label: str | None, path_text: str | None, cut: float | None
) -> str:
    """Why a search shows nothing: the images it found are gone from disk, or which filters
    no image passes, or an empty collection."""
    if found:
        what = "the image found" if found == 1 else f"the {found} images found"
        gone = [r for r in ctx.collection.manifest.get("roots", []) if not os.path.isdir(r)]
        if gone:  # a whole folder: moved, most likely, and one command finds it again
            return (
                f"{what} can no longer be read: their folder {md(gone[0])} is gone. If it "
                "moved, "
                + code(f"moco-search index --collection {ctx.path} --move-root {gone[0]} NEW_PLACE")
                + " keeps every id and label"
            )
        return (
            f"{what} can no longer be read (moved or deleted since it was indexed? re-index "
            "the collection)"
        )
    filters, text = make_filters(label, path_text), (path_text or "").strip()
    said = []
    if filters and filters.label:
        said.append(f"label {md(repr(filters.label))}")
    if filters and filters.path_glob:
        glob = filters.path_glob != f"*{text}*"
        said.append(f"path {'glob' if glob else 'contains'} {md(repr(text))}")
    if cut is not None:
        said.append(f"score at least {cut:g}")
    if said:
        return "no image passes the filters (" + ", ".join(said) + ")"
    return "the collection is empty" if not len(ctx.collection) else ""


def to_result(
    ctx: AppContext,
    hits: list[Hit],
    seconds: float,
    query_id: int | None = None,
    filters: tuple[str | None, str | None, float | None] = (None, None, None),
) -> SearchResult:
    """Hits as gallery tiles (thumbnails); a hit whose picture cannot be made now is dropped,
    and counted in the status. ``filters`` (label, path text, cut-off) say why, when nothing is
    left."""
    shown = [(h, p) for h in hits if (p := ctx.shown_file(h.path, h.meta)) is not None]
    why = "" if shown else none_found(ctx, len(hits), *filters)
    return SearchResult(
        [(p, caption(h, query_id)) for h, p in shown],
        [h for h, _ in shown],
        seconds,
        why,
        unshown=len(hits) - len(shown),
    )


def search(
    ctx: AppContext,
    image: Any,
    k: Any = 12,
    label: str | None = None,
    path_text: str | None = None,
    min_score: float | None = None,
    positives: Sequence[int] = (),
    negatives: Sequence[int] = (),
) -> SearchResult:
    """Top-k images like ``image`` (an upload), refined by example ids (relevance feedback).

    Rocchio feedback: the query is the mean of the upload and the positive examples minus half
    the mean of the negatives. The negative examples themselves are left out of the results: the
    user has just said they are not what they are looking for.
    """
    k = check_k(k)
    filters = make_filters(label, path_text)
    query: list[Any] = [decode_upload(ctx, image)] if image is not None else []
    query += [int(i) for i in positives]
    if not query:
        raise UserError("Upload, paste or drop an image first (or click an example).")
    cut = check_cut(min_score)
    excluded = {int(i) for i in negatives}
    t0 = time.perf_counter()
    try:
        with still_indexed():
            hits = ctx.collection.search(
                query,
                k=k + len(excluded),
                negatives=sorted(excluded),
                filters=filters,
                min_score=cut,
            )
    except ValueError as e:  # e.g. positives and negatives cancel out
        raise UserError(str(e)) from e
    hits = [h for h in hits if h.id not in excluded][:k]
    return to_result(ctx, hits, time.perf_counter() - t0, filters=(label, path_text, cut))


def search_id(
    ctx: AppContext,
    image_id: int,
    k: Any = 12,
    label: str | None = None,
    path_text: str | None = None,
    min_score: float | None = None,
) -> SearchResult:
    """ "More like this": the neighbours of an indexed image, itself first."""
    k = check_k(k)
    t0 = time.perf_counter()
    with still_indexed():
        vec = ctx.collection.vectors([int(image_id)])[0]
    cut = check_cut(min_score)
    hits = ctx.collection.search_vector(
        vec, k, filters=make_filters(label, path_text), min_score=cut
    )
    seconds = time.perf_counter() - t0
    return to_result(ctx, hits, seconds, int(image_id), filters=(label, path_text, cut))


def selected_hit(hits: Sequence[Hit] | None, index: Any) -> Hit:
    """The hit behind a clicked gallery item: ``hits`` is the server's own list of the last
    search's results, ``index`` the position the browser reports (``SelectData.index``)."""
    if not hits:
        raise UserError("Run a search first.")
    try:
        i = int(index[0] if isinstance(index, (list, tuple)) else index)
    except (TypeError, ValueError, IndexError) as e:
        raise UserError(f"Not a result position: {index!r}") from e
    if not 0 <= i < len(hits):
        raise UserError(f"No result number {i + 1}")
    return hits[i]


def selection_text(hit: Hit) -> str:
    """The line under the gallery that says which result is selected."""
    label = f", label {md(hit.label)}" if hit.label else ""
    return (
        f"Selected **{md(Path(hit.relpath).name)}** (score {hit.score:.3f}{label}): search from "
        "it, or mark it as more or less like what you are looking for."
    )


def query_image(ctx: AppContext, hit: Hit) -> Image.Image | None:
    """The picture of ``hit`` to put in the query box: the pixels of its thumbnail, which Gradio
    saves into its upload cache, so that searching from it again is an ordinary upload."""
    shown = ctx.shown_file(hit.path, hit.meta)
    if shown is None:
        return None
    with Image.open(shown) as im:
        return im.convert("RGB")


def toggle(ids: Sequence[int], image_id: int, others: Sequence[int]) -> tuple[list[int], list[int]]:
    """Add ``image_id`` to one feedback list (removing it from the other); again removes it."""
    ids, others = [int(i) for i in ids], [int(i) for i in others if int(i) != int(image_id)]
    ids = [i for i in ids if i != int(image_id)] if int(image_id) in ids else [*ids, int(image_id)]
    return ids, others


def feedback_text(
    ctx: AppContext | None, positives: Sequence[int], negatives: Sequence[int]
) -> str:
    """The examples marked so far, by file name."""
    if not positives and not negatives:
        return "No examples yet: select a result, then mark it as more or less like this."
    names: dict[int, str] = {}
    if ctx is not None:
        with still_indexed():
            recs = ctx.collection.records([*positives, *negatives])
        names = {r.id: Path(r.relpath).name for r in recs}

    def listed(ids: Sequence[int]) -> str:
        return ", ".join(code(names.get(int(i), f"#{i}")) for i in ids) or "-"

    return f"**More like:** {listed(positives)} · **Less like:** {listed(negatives)}"


def hit_rows(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    """JSON-friendly rows of ``hits`` (what the API and the downloads return)."""
    return [
        {
            "rank": i + 1,
            "id": h.id,
            "score": round(h.score, 4),
            "label": h.label,
            "path": h.path,
            "relpath": h.relpath,
        }
        for i, h in enumerate(hits)
    ]


def export(hits: Sequence[Hit] | None, fmt: str) -> str:
    """Write the shown results (the server's own hits) to a CSV or JSON file in a fresh temp
    dir; return its path."""
    rows = hit_rows(hits or [])
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
