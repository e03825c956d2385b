"""``Events``: what each event of the UI does, as methods over one ``AppContext``.

``app.ui`` lays the components out and wires each event to one of these methods; the methods
turn component values into display values through ``app.handlers``, ``app.classifying`` and
``app.overview``. A refusal (a ``UserError``, or the collection's ``EncoderMissing``) is one line
in the server's log, never a traceback, and one sentence for whoever asked: ``guarded`` shows it
to the page as a warning and leaves every output as it was; ``api_guarded`` raises it as
``gr.Error``, which a ``gradio_client`` caller receives as an exception. Any other exception in a
page event (a fault, not a mistake) is shown the same way, with its traceback in the server's
log. (The page's events do not raise: Gradio marks every output of a failed event "Error" and
blanks it, so a click on "Search from this one" with nothing selected would wipe out the results
and the query picture.)

Whatever a method acts on comes from server-side ``gr.State`` (the last search's hits, the
selected hit, the feedback ids, the embedding map), never from a component value the client
sends back: any event can be replayed through the queue API with edited data (docs/ui.md
"Security"). Method names are the events' names in that API.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from app import classifying, encoder_info, handlers, overview
from app.context import AppContext
from app.handlers import UserError
from app.markup import md, plain_html
from indexes import EncoderMissing

NO_PICK = "Click a result to select it: search from it, or mark it as more or less like this."
log = logging.getLogger(__name__)


def refused(
    fn: Callable[..., Any], answer: Callable[[Exception], Any], faults: bool = False
) -> Callable[..., Any]:
    """``fn``, whose refusals (``UserError``, ``EncoderMissing``) are answered by ``answer``;
    with ``faults``, so is any other exception (``explained``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not (faults or isinstance(e, (UserError, EncoderMissing))):
                raise
            return answer(explained(fn.__name__, e))

    return wrapper


def explained(event: str, e: Exception) -> Exception:
    """What to tell the user about ``e``: a refusal as it is (one line in the server's log); a
    fault of ours or of the machine as where to look (its traceback in the server's log)."""
    if isinstance(e, (UserError, EncoderMissing)):
        log.info("%s refused: %s", event, e)
        return e
    log.exception("%s failed", event)
    return RuntimeError(
        f"Something went wrong ({type(e).__name__}: {e}); the server's log has the details"
    )


def warning(e: Exception) -> Any:
    """The page's answer: the sentence as a warning, and every output keeps what it shows."""
    gr.Warning(plain_html(e))
    return gr.skip()  # one skip() stands for all of an event's outputs


def kept(e: Exception, n: int) -> list[Any]:
    """``warning`` for an event that also outputs an upload box: skips for its ``n`` other
    outputs, while the box must be sent back what it shows (``app.ui.upload_image``)."""
    gr.Warning(plain_html(e))
    return [gr.skip()] * n


def error(e: Exception) -> Any:
    """The public API's answer: an error for the caller."""
    raise gr.Error(str(e), print_exception=False) from None


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    return refused(fn, warning, faults=True)  # the page keeps what it shows, whatever failed


def api_guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    return refused(fn, error)


def picture(path: Any) -> Any:
    """A saved PNG (a confusion matrix in the collection) as pixels: Gradio copies those into its
    cache, while the collection's own files are blocked from being served."""
    if not path:
        return None
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def unselected(r: handlers.SearchResult) -> Any:
    """New results' tiles, none framed as selected."""
    return gr.Gallery(value=r.gallery, selected_index=None)


def refined(r: handlers.SearchResult, hit: Any) -> tuple[Any, ...]:
    """A refined search's outputs; the gallery's selection frame follows the selected hit."""
    tiles = gr.Gallery(value=r.gallery, selected_index=r.position(hit))
    return tiles, r.rows(), r.status(), r.hits


class Events:
    """The UI's event handlers over ``ctx``."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    # --- Search --------------------------------------------------------------------------------
    @api_guarded
    def do_search(self, img: Any, k: Any, label: Any, text: Any, cut: Any) -> tuple[Any, ...]:
        """A new query: plain values (the public API's ``search``)."""
        r = handlers.search(self.ctx, img, k, label, text, cut)
        return r.gallery, r.rows(), r.status(), r.hits

    @guarded
    def new_search(self, img: Any, k: Any, label: Any, text: Any, cut: Any) -> tuple[Any, ...]:
        """The page's new search (Search, the first load): the old selection no longer points
        at anything shown, and neither does the gallery's frame (it stayed on the tile)."""
        r = handlers.search(self.ctx, img, k, label, text, cut)
        return unselected(r), r.rows(), r.status(), r.hits, None, NO_PICK

    def upload_search(self, img: Any, k: Any, label: Any, text: Any, cut: Any) -> tuple[Any, ...]:
        """An upload: a new search, and the query box shows it as the browser can draw it
        (``handlers.for_browser``: an iPhone's HEIC as a PNG)."""
        try:
            searched, shown = handlers.for_browser(self.ctx, img)
            r = handlers.search(self.ctx, searched, k, label, text, cut)
        except Exception as e:
            return (*kept(explained("upload_search", e), 9), img)
        return (
            unselected(r),
            r.rows(),
            r.status(),
            r.hits,
            None,
            NO_PICK,
            *self.clear_examples(),  # marked for another picture: not this one's examples
            shown,
        )

    def show_upload(self, img: Any) -> Any:
        """An upload to classify, as the browser can draw it (``handlers.for_browser``)."""
        try:
            return handlers.for_browser(self.ctx, img)[1]
        except Exception as e:
            warning(explained("show_upload", e))
            return img  # never a skip (app.ui.upload_image)

    @guarded
    def select_result(self, found: list[Any], evt: gr.SelectData) -> tuple[Any, str]:
        """Selecting a result only selects it: marking it must not change the query."""
        hit = handlers.selected_hit(found, evt.index)
        return hit, handlers.selection_text(hit)

    def search_from(
        self, hit: Any, shown: Any, k: Any, label: Any, text: Any, cut: Any
    ) -> tuple[Any, ...]:
        """The selected result becomes the query (its picture too). A refusal sends the query
        box back the upload it shows (``shown``), never a skip (``app.ui.upload_image``)."""
        try:
            if not hit:
                raise UserError("Click a result first.")
            r = handlers.search_id(self.ctx, hit.id, k, label, text, cut)
        except Exception as e:
            return (*kept(explained("search_from", e), 4), shown, gr.skip())
        return (
            *refined(r, hit),
            handlers.query_image(self.ctx, hit),
            f"Searching from **{md(Path(hit.relpath).name)}**",
        )

    def _mark(self, hit: Any, pos: list[int], neg: list[int], more: bool) -> tuple[Any, ...]:
        if not hit:
            raise UserError("Click a result first.")
        if more:
            pos, neg = handlers.toggle(pos, hit.id, neg)
        else:
            neg, pos = handlers.toggle(neg, hit.id, pos)
        return pos, neg, handlers.feedback_text(self.ctx, pos, neg)

    @guarded
    def mark_more(self, hit: Any, pos: list[int], neg: list[int]) -> tuple[Any, ...]:
        return self._mark(hit, pos, neg, more=True)

    @guarded
    def mark_less(self, hit: Any, pos: list[int], neg: list[int]) -> tuple[Any, ...]:
        return self._mark(hit, pos, neg, more=False)

    def clear_examples(self) -> tuple[Any, ...]:
        return [], [], handlers.feedback_text(self.ctx, [], [])

    @guarded
    def do_refine(
        self,
        img: Any,
        pos: list[int],
        neg: list[int],
        k: Any,
        label: Any,
        text: Any,
        cut: Any,
        hit: Any,
    ) -> tuple[Any, ...]:
        if not pos and not neg:
            raise UserError("Mark a result as more or less like this one first.")
        r = handlers.search(self.ctx, img, k, label, text, cut, positives=pos, negatives=neg)
        if r.position(hit) is None:  # the selected result is no longer shown: not selected
            return (*refined(r, None), None, NO_PICK)
        return (*refined(r, hit), hit, gr.skip())

    @guarded
    def export_csv(self, found: list[Any]) -> Any:
        return gr.File(value=handlers.export(found, "csv"), visible=True)

    @guarded
    def export_json(self, found: list[Any]) -> Any:
        return gr.File(value=handlers.export(found, "json"), visible=True)

    # --- Classify ------------------------------------------------------------------------------
    @api_guarded
    def do_classify(self, img: Any, how: Any) -> tuple[Any, str]:
        """The public API's ``classify``."""
        return classifying.classify(self.ctx, img, how)

    @guarded
    def classify_page(self, img: Any, how: Any) -> tuple[Any, str]:
        """The Classify button: a refusal keeps the last answer on show."""
        return classifying.classify(self.ctx, img, how)

    def follow_query(self, q: Any, shown: Any, how: Any) -> tuple[Any, ...]:
        """Opening the Classify tab classifies the Search tab's current query (an upload
        Gradio has checked is in its cache), so the panel is never empty beside it. Without
        one, the image box gets back what it shows (``shown``), never a skip
        (``app.ui.upload_image``)."""
        if not q:
            return shown, gr.skip(), gr.skip()
        try:
            return (q, *classifying.classify(self.ctx, q, how))
        except Exception as e:  # shown in the panel, which has no answer for this query yet
            return q, None, md(explained("follow_query", e))

    @guarded
    def do_train(self, src: str, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
        res = classifying.train(self.ctx, src, progress=lambda f, m: progress(f, desc=m))
        names = classifying.methods(self.ctx)
        return (
            classifying.trained_markdown(res),
            picture(res.confusion_png),
            gr.update(choices=names, value=res.name),
        )

    @guarded
    def label_image(self, hit: Any, text: Any) -> str:
        return classifying.label_image(self.ctx, hit, text)

    # --- Collection ----------------------------------------------------------------------------
    @guarded
    def do_index(
        self,
        path: str,
        how: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> tuple[Any, ...]:
        """Run an index job in the background, showing its progress until it ends; then
        everything that shows the collection's size or labels shows the new collection."""
        try:
            job = self.ctx.start_index(path.strip() or None)
        except (ValueError, PermissionError) as e:
            raise UserError(str(e)) from e
        while not job.finished:
            progress((job.done, job.total or None), desc=job.line(), unit="images")
            time.sleep(0.25)
        return (md(job.message), *self._collection_view(how))

    @guarded
    def page_load(self, how: Any) -> tuple[Any, ...]:
        """A page (re)loaded shows the collection as it is now, not as the server found it
        at start: another process may have indexed it since (a nightly run, a re-embedding
        with another encoder)."""
        self.ctx.collection.follow_index_runs()
        return self._collection_view(how)

    def _collection_view(self, how: Any) -> tuple[Any, ...]:
        """Whatever shows the collection's size, labels or encoder: the Collection tab's stats,
        histogram and errors, the heading, the label filter, the classifiers, the Encoder tab."""
        counts = overview.label_histogram(self.ctx)
        names = classifying.methods(self.ctx)
        return (
            overview.stats_markdown(self.ctx),
            gr.BarPlot(value=counts, y_lim=overview.histogram_top(counts)),
            overview.error_rows(self.ctx),
            overview.heading(self.ctx),
            gr.Dropdown(choices=["(any)", *self.ctx.collection.label_counts()]),
            gr.Dropdown(
                choices=names,
                value=how if how in names else classifying.default_method(self.ctx, names),
            ),
            encoder_info.encoder_markdown(self.ctx),
            *encoder_info.loss_views(self.ctx),
            encoder_info.config_json(self.ctx),
        )

    @guarded
    def find_duplicates(self, threshold: float) -> list[list[Any]]:
        return overview.duplicate_rows(self.ctx, threshold)

    @guarded
    def draw_map(self) -> tuple[Any, Any]:
        m = overview.embedding_map(self.ctx)
        return m.html(), m

    @guarded
    def click_map(self, m: overview.EmbeddingMap | None, evt: gr.EventData) -> tuple[Any, str]:
        """The image nearest the clicked pixel; ids are the map's own, looked up here (the
        client sends only where it was clicked, and that is checked to be two numbers)."""
        data = getattr(evt, "_data", None) or {}
        try:
            x, y = float(data["x"]), float(data["y"])
        except (KeyError, TypeError, ValueError):
            x = y = float("nan")
        hit_id = m.nearest(x, y) if m is not None and math.isfinite(x + y) else None
        if hit_id is None:
            return None, "No point there: click on a dot."
        rec = self.ctx.collection.records([hit_id])[0]
        shown = self.ctx.shown_file(rec.path, rec.meta())
        return shown, f"**{md(rec.relpath)}** (label: {md(rec.label or '-')}, id {rec.id})"
