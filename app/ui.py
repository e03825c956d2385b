"""``build_demo(ctx) -> gr.Blocks``: the layout and the wiring, no logic.

Every event calls a function of ``app.handlers`` / ``app.classifying`` / ``app.overview`` /
``app.encoder_info``; ``_guard`` turns their ``UserError`` into ``gr.Error`` so the message shows
in the UI (and one line in the server's log). ``search`` and ``classify`` are public API endpoints
(``gradio_client`` can call them by name). Nothing is loaded at import time; theme and CSS go to
``launch()`` (Gradio 6).

Whatever a handler acts on comes from server-side ``gr.State`` (the last search's hits, the
selected hit, the feedback ids, the embedding map), never from a component value the client
sends back: any event can be replayed through the queue API with edited data.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from app import classifying, encoder_info, handlers, overview
from app.context import USER_PROBE, AppContext
from app.handlers import UserError

GALLERY_COLUMNS = 6
NO_PICK = "Click a result to select it: search from it, or mark it as more or less like this."
log = logging.getLogger(__name__)


def upload_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` that hands the handler the uploaded file's path without decoding it.

    Stock ``gr.Image`` opens uploads with PIL before any handler runs, so a bomb or a non-image
    fails there with an opaque error. Here ``moco.load_image`` decodes them in the handler, with
    a pixel limit and a clear reason. (Not a subclass: Gradio writes a ``.pyi`` file beside the
    source of every Component subclass it sees defined.)
    """
    image = gr.Image(type="filepath", **kwargs)
    stock = image.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)  # an upload Gradio has already checked is in its cache
        return stock(payload)

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:  # a user's mistake: one line here, the sentence in the browser
            log.info("%s refused: %s", fn.__name__, e)
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def _picture(path: Any) -> Any:
    """A saved PNG (a confusion matrix in the collection) as pixels: Gradio copies those into its
    cache, while the collection's own files are blocked from being served."""
    if not path:
        return None
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def build_demo(ctx: AppContext) -> gr.Blocks:
    """The four tabs (Search, Classify, Collection, Encoder) over the opened collection."""
    labels = ["(any)", *ctx.collection.label_counts()]
    with gr.Blocks(title=f"moco-search · {ctx.title}") as demo:
        gr.Markdown(f"## moco-search · {ctx.title} · {len(ctx.collection)} images")
        selected = gr.State(None)  # the clicked Hit
        hits = gr.State([])  # the last search's Hits, as the server found them
        positives, negatives = gr.State([]), gr.State([])
        with gr.Tab("Search"), gr.Row():
            with gr.Column(scale=1, min_width=260):
                query = upload_image(label="Query image", value=ctx.example, format="png",
                                    sources=["upload", "clipboard", "webcam"], height=260)
                k = gr.Slider(1, handlers.MAX_K, value=12, step=1, label="Results (k)")
                label = gr.Dropdown(labels, value="(any)", label="Label filter")
                path_text = gr.Textbox(label="Path contains (or a glob: 2024/*.jpg)")
                cutoff = gr.Slider(-1, 1, value=-1, step=0.01,
                                   label="Similarity cut-off (-1: none)")
                go = gr.Button("Search", variant="primary", elem_id="search-btn")
                status = gr.Markdown(elem_id="search-status")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Most similar", columns=GALLERY_COLUMNS,
                                     height=560, allow_preview=False, object_fit="contain",
                                     elem_id="results")
                picked = gr.Markdown(NO_PICK, elem_id="picked")
                with gr.Row():
                    from_btn = gr.Button("Search from this one", elem_id="from-btn")
                    more = gr.Button("+ More like this one", elem_id="more-btn")
                    less = gr.Button("− Less like this one", elem_id="less-btn")
                    refine = gr.Button("Refine with examples", elem_id="refine-btn")
                    clear = gr.Button("Clear examples")
                fb = gr.Markdown(handlers.feedback_text(ctx, [], []), elem_id="feedback")
                with gr.Row():
                    csv_btn = gr.Button("Download CSV", size="sm")
                    json_btn = gr.Button("Download JSON", size="sm")
                    download = gr.File(label="Download", height=80, visible=False)
                with gr.Accordion("Results as JSON", open=False):
                    rows = gr.JSON(label="hits")
        with gr.Tab("Classify", elem_id="classify-tab") as cls_tab:
            with gr.Row():
                with gr.Column():
                    cls_image = upload_image(label="Image to classify (follows the Search "
                                             "tab's query)", value=ctx.example, height=260)
                    method = gr.Dropdown(classifying.methods(ctx),
                                         value=classifying.default_method(ctx),
                                         label="Classifier (probe or kNN)")
                    cls_go = gr.Button("Classify", variant="primary")
                with gr.Column():
                    top5 = gr.Label(num_top_classes=5, label="Top-5 labels", elem_id="top5")
                    cls_md = gr.Markdown()
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Train a linear probe")
                    source = gr.Radio([("labels from the indexed folders", "default"),
                                       ("labels given here", USER_PROBE)], value="default",
                                      label="Train on")
                    train_go = gr.Button("Train / retrain probe")
                    probe_md = gr.Markdown(classifying.probe_summary(
                        ctx, classifying.default_method(ctx))[0])
                    gr.Markdown("### Label the selected search result")
                    new_label = gr.Textbox(label="Label (empty removes it)")
                    label_go = gr.Button("Label it")
                    label_md = gr.Markdown()
                with gr.Column():
                    confusion = gr.Image(_picture(classifying.probe_summary(
                        ctx, classifying.default_method(ctx))[1]), label="Held-out confusion",
                        interactive=False)
        with gr.Tab("Collection"):
            stats = gr.Markdown(overview.stats_markdown(ctx))
            with gr.Row():
                folder = gr.Textbox(label=overview.index_box_label(ctx), scale=3)
                index_go = gr.Button("Index", scale=1)
            index_md = gr.Markdown()
            counts = overview.label_histogram(ctx)
            top = int(counts["images"].max()) + 1 if len(counts) else 1
            hist = gr.BarPlot(counts, x="label", y="images", label="Images per label",
                              height=260, y_lim=[0, top])
            with gr.Accordion("Errors", open=False):
                errors = gr.Dataframe(overview.error_rows(ctx), headers=["file", "reason",
                                                                          "root"])
            with gr.Accordion("Duplicates", open=False):
                with gr.Row():
                    thr = gr.Slider(0.8, 1.0, value=0.95, step=0.005, label="Similarity at least")
                    dup_go = gr.Button("Find duplicates")
                dups = gr.Dataframe(headers=["images", "min score", "files"])
            with gr.Row():
                map_go = gr.Button("Draw the embedding map (PCA)")
            with gr.Row():
                map_img = gr.Image(label="Embeddings", interactive=False, scale=3,
                                   elem_id="map")
                with gr.Column(scale=1):
                    point_img = gr.Image(label="Clicked point", interactive=False, height=220)
                    point_md = gr.Markdown()
            map_state = gr.State(None)
        with gr.Tab("Encoder"):
            gr.Markdown(encoder_info.encoder_markdown(ctx))
            curve = encoder_info.loss_curve(ctx)
            if curve is not None:
                gr.LinePlot(curve, x="epoch", y="loss", label="Pretraining loss", height=280)
            else:
                gr.Markdown("_No pretraining log was recorded with this encoder._")
            with gr.Accordion("Configuration", open=False):
                gr.Code(encoder_info.config_json(ctx), language="json")

        # --- Search wiring --------------------------------------------------------------------
        filters = [k, label, path_text, cutoff]
        results = [gallery, rows, status, hits]

        def shown(r: handlers.SearchResult, hit: Any) -> tuple[Any, ...]:
            """A refined search's outputs; the selection frame follows the selected hit."""
            tiles = gr.Gallery(value=r.gallery, selected_index=r.position(hit))
            return tiles, r.rows(), r.status(), r.hits

        @_guard
        def do_search(img: Any, k_: Any, lab: Any, text: Any, cut: Any) -> tuple[Any, ...]:
            """A new query: plain values (the public API's); the selection goes (below)."""
            r = handlers.search(ctx, img, k_, lab, text, cut)
            return r.gallery, r.rows(), r.status(), r.hits

        search_io = dict(fn=do_search, inputs=[query, *filters], outputs=results)

        def on_failure(event: Any) -> Any:
            """A refused search leaves no stale status or selection line behind."""
            event.failure(lambda: ("", NO_PICK, None), None, [status, picked, selected],
                          api_visibility="private")
            return event

        def unselect(event: Any) -> None:
            """New results: the old selection no longer points at anything shown."""
            event.success(lambda: (None, NO_PICK), None, [selected, picked],
                          api_visibility="private")

        unselect(on_failure(go.click(**search_io, api_name="search")))
        unselect(on_failure(query.upload(**search_io, api_visibility="private")))
        if ctx.example:
            demo.load(**search_io, api_visibility="private")

        @_guard
        def select_result(found: list[Any], evt: gr.SelectData) -> tuple[Any, str]:
            """Selecting a result only selects it: marking it must not change the query."""
            hit = handlers.selected_hit(found, evt.index)
            return hit, handlers.selection_text(hit)

        gallery.select(select_result, [hits], [selected, picked], api_visibility="private")

        @_guard
        def search_from(hit: Any, k_: Any, lab: Any, text: Any, cut: Any) -> tuple[Any, ...]:
            if not hit:
                raise UserError("Click a result first.")
            r = handlers.search_id(ctx, hit.id, k_, lab, text, cut)
            return (*shown(r, hit), handlers.query_image(ctx, hit),
                    f"Searching from **{Path(hit.relpath).name}**")

        on_failure(from_btn.click(search_from, [selected, *filters], [*results, query, picked],
                                  api_visibility="private"))

        def mark(which: str) -> Callable[..., Any]:
            @_guard
            def fn(hit: Any, pos: list[int], neg: list[int]) -> tuple[Any, ...]:
                if not hit:
                    raise UserError("Click a result first.")
                if which == "pos":
                    pos, neg = handlers.toggle(pos, hit.id, neg)
                else:
                    neg, pos = handlers.toggle(neg, hit.id, pos)
                return pos, neg, handlers.feedback_text(ctx, pos, neg)
            return fn

        more.click(mark("pos"), [selected, positives, negatives], [positives, negatives, fb],
                   api_visibility="private")
        less.click(mark("neg"), [selected, positives, negatives], [positives, negatives, fb],
                   api_visibility="private")
        clear.click(lambda: ([], [], handlers.feedback_text(ctx, [], [])), None,
                    [positives, negatives, fb], api_visibility="private")

        @_guard
        def do_refine(img: Any, pos: list[int], neg: list[int], k_: Any, lab: Any, text: Any,
                      cut: Any, hit: Any) -> tuple[Any, ...]:
            if not pos and not neg:
                raise UserError("Mark a result as more or less like this one first.")
            r = handlers.search(ctx, img, k_, lab, text, cut, positives=pos, negatives=neg)
            return shown(r, hit)

        on_failure(refine.click(do_refine, [query, positives, negatives, *filters, selected],
                                results, api_visibility="private"))

        def exporter(fmt: str) -> Callable[..., Any]:
            @_guard
            def export(found: list[Any]) -> Any:
                return gr.File(value=handlers.export(found, fmt), visible=True)
            return export

        csv_btn.click(exporter("csv"), [hits], [download], api_visibility="private")
        json_btn.click(exporter("json"), [hits], [download], api_visibility="private")

        # --- Classify wiring ------------------------------------------------------------------
        @_guard
        def do_classify(img: Any, how: Any) -> tuple[Any, str]:
            return classifying.classify(ctx, img, how)

        cls_go.click(do_classify, [cls_image, method], [top5, cls_md], api_name="classify")

        def follow_query(q: Any, how: Any) -> tuple[Any, ...]:
            """Opening the Classify tab classifies the Search tab's current query (an upload
            Gradio has checked is in its cache), so the panel is never empty beside it."""
            if not q:
                return gr.update(), gr.update(), gr.update()
            try:
                return (q, *classifying.classify(ctx, q, how))
            except UserError as e:
                return q, None, str(e)

        cls_tab.select(follow_query, [query, method], [cls_image, top5, cls_md],
                       api_visibility="private")

        @_guard
        def do_train(src: str, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
            res = classifying.train(ctx, src, progress=lambda f, m: progress(f, desc=m))
            names = classifying.methods(ctx)
            return (res.markdown(), _picture(res.confusion_png),
                    gr.update(choices=names, value=res.name))

        train_go.click(do_train, [source], [probe_md, confusion, method],
                       api_visibility="private", concurrency_id="train", concurrency_limit=1)
        @_guard
        def label_image(hit: Any, text: Any) -> str:
            return classifying.label_image(ctx, hit, text)

        label_go.click(label_image, [selected, new_label], [label_md], api_visibility="private")

        # --- Collection wiring ----------------------------------------------------------------
        @_guard
        def do_index(path: str, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
            try:
                job = ctx.start_index(path.strip() or None)
            except (ValueError, PermissionError) as e:
                raise UserError(str(e)) from e
            while not job.finished:
                progress((job.done, job.total or None), desc=job.line(), unit="images")
                time.sleep(0.25)
            return (job.message, overview.stats_markdown(ctx), overview.label_histogram(ctx),
                    overview.error_rows(ctx))

        index_go.click(do_index, [folder], [index_md, stats, hist, errors],
                       api_visibility="private", concurrency_id="index", concurrency_limit=1)
        dup_go.click(lambda t: overview.duplicate_rows(ctx, t), [thr], [dups],
                     api_visibility="private")

        def draw_map() -> tuple[Any, Any]:
            m = overview.embedding_map(ctx)
            return m.image, m

        map_go.click(draw_map, None, [map_img, map_state], api_visibility="private")

        def click_map(m: overview.EmbeddingMap | None, evt: gr.SelectData) -> tuple[Any, str]:
            hit_id = m.nearest(*evt.index[:2]) if m is not None else None
            if hit_id is None:
                return None, "No point there: click on a dot."
            rec = ctx.collection.records([hit_id])[0]
            shown = ctx.shown_file(rec.path, rec.meta())
            return shown, f"**{rec.relpath}** (label: {rec.label or '-'}, id {rec.id})"

        map_img.select(click_map, [map_state], [point_img, point_md], api_visibility="private")
    return demo
