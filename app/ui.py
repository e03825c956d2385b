"""``build_demo(ctx) -> gr.Blocks``: the layout and the wiring, no logic.

Every event calls a method of ``app.events.Events`` (what it does, and why it trusts nothing the
client sends back). ``search`` and ``classify`` are public API endpoints (``gradio_client`` can
call them by name); the others are private. Nothing is loaded at import time; theme and CSS go to
``launch()`` (Gradio 6).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import classifying, encoder_info, handlers, overview
from app.context import USER_PROBE, AppContext
from app.events import NO_PICK, Events, picture
from indexes.duplicates import THRESHOLD

GALLERY_COLUMNS = 6
# Gradio shows a picture at its own size when it is smaller than its box (``scale-down``): a 28-px
# digit or a 64-px icon was a stamp in the middle of the query box. Fit every picture to its box.
CSS = ".fit-box .image-frame img { object-fit: contain; }"


def upload_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` that hands the handler the uploaded file's path without decoding it.

    Stock ``gr.Image`` opens uploads with PIL before any handler runs, so a bomb or a non-image
    fails there with an opaque error. Here ``moco.load_image`` decodes them in the handler, with
    a pixel limit and a clear reason. (Not a subclass: Gradio writes a ``.pyi`` file beside the
    source of every Component subclass it sees defined, and the page does not draw one.)

    The patch lives on this instance, and Gradio replaces an output's instance for the session
    whenever an event sends it an update (``gr.update()``, ``gr.skip()``): events send these
    boxes plain values only (``app.events``).
    """
    image = gr.Image(type="filepath", **kwargs)
    stock = image.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)  # an upload Gradio has already checked is in its cache
        return stock(payload)

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def build_demo(ctx: AppContext) -> gr.Blocks:
    """The four tabs (Search, Classify, Collection, Encoder) over the opened collection."""
    labels = ["(any)", *ctx.collection.label_counts()]
    names = classifying.methods(ctx)
    first = classifying.default_method(ctx, names)
    summary, confusion_png = classifying.probe_summary(ctx, first)
    with gr.Blocks(title=f"moco-search · {ctx.title}") as demo:
        title = gr.Markdown(overview.heading(ctx))
        selected = gr.State(None)  # the clicked Hit
        hits = gr.State([])  # the last search's Hits, as the server found them
        positives, negatives = gr.State([]), gr.State([])
        with gr.Tab("Search"), gr.Row():
            with gr.Column(scale=1, min_width=260):
                query = upload_image(
                    label="Query image",
                    value=ctx.example,
                    format="png",
                    sources=["upload", "clipboard", "webcam"],
                    height=260,
                    elem_classes="fit-box",
                )
                k = gr.Slider(1, handlers.MAX_K, value=12, step=1, label="Results (k)")
                label = gr.Dropdown(labels, value="(any)", label="Label filter")
                path_text = gr.Textbox(label="Path contains (or a glob: 2024/*.jpg)")
                cutoff = gr.Slider(
                    -1, 1, value=-1, step=0.01, label="Similarity cut-off (-1: none)"
                )
                go = gr.Button("Search", variant="primary", elem_id="search-btn")
                status = gr.Markdown(elem_id="search-status")
            with gr.Column(scale=3):
                gallery = gr.Gallery(
                    label="Most similar",
                    columns=GALLERY_COLUMNS,
                    height=560,
                    allow_preview=False,
                    object_fit="contain",
                    elem_id="results",
                )
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
                    cls_image = upload_image(
                        label="Image to classify (follows the Search tab's query)",
                        value=ctx.example,
                        height=260,
                        elem_classes="fit-box",
                    )
                    method = gr.Dropdown(
                        names,
                        value=first,
                        label="Classifier (probe or kNN)",
                    )
                    cls_go = gr.Button("Classify", variant="primary")
                with gr.Column():
                    top5 = gr.Label(num_top_classes=5, label="Top-5 labels", elem_id="top5")
                    cls_md = gr.Markdown()
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Train a linear probe")
                    source = gr.Radio(
                        [
                            ("labels from the indexed folders", "default"),
                            ("labels given here", USER_PROBE),
                        ],
                        value="default",
                        label="Train on",
                    )
                    train_go = gr.Button("Train / retrain probe")
                    probe_md = gr.Markdown(summary)
                    gr.Markdown("### Label the selected search result")
                    new_label = gr.Textbox(label="Label (empty removes it)")
                    label_go = gr.Button("Label it")
                    label_md = gr.Markdown(elem_id="label-md")
                with gr.Column():
                    confusion = gr.Image(
                        picture(confusion_png),
                        label="Held-out confusion",
                        interactive=False,
                    )
        with gr.Tab("Collection"):
            stats = gr.Markdown(overview.stats_markdown(ctx))
            with gr.Row():
                folder = gr.Textbox(label=overview.index_box_label(ctx), scale=3)
                index_go = gr.Button("Index", scale=1)
            index_md = gr.Markdown()
            counts = overview.label_histogram(ctx)
            hist = gr.BarPlot(
                counts,
                x="label",
                y="images",
                label="Images per label",
                height=260,
                y_lim=overview.histogram_top(counts),
            )
            with gr.Accordion("Errors", open=False):
                errors = gr.Dataframe(overview.error_rows(ctx), headers=["file", "reason", "root"])
            with gr.Accordion("Duplicates", open=False):
                with gr.Row():
                    thr = gr.Slider(
                        0.8, 1.0, value=THRESHOLD, step=0.005, label="Similarity at least"
                    )
                    dup_go = gr.Button("Find duplicates")
                dups = gr.Dataframe(headers=["images", "min score", "files"])
            with gr.Row():
                map_go = gr.Button("Draw the embedding map (PCA)")
            with gr.Row():
                map_img = gr.HTML(
                    "", label="Embeddings", js_on_load=overview.MAP_JS, elem_id="map", scale=3
                )
                with gr.Column(scale=1):
                    point_img = gr.Image(
                        label="Clicked point", interactive=False, height=220, elem_classes="fit-box"
                    )
                    point_md = gr.Markdown()
            map_state = gr.State(None)
        with gr.Tab("Encoder"):
            encoder_md = gr.Markdown(encoder_info.encoder_markdown(ctx))
            curve = encoder_info.loss_curve(ctx)  # both made: a page load may show the other
            loss_plot = gr.LinePlot(
                curve,
                x="epoch",
                y="loss",
                label="Pretraining loss",
                height=280,
                visible=curve is not None,
            )
            no_log = gr.Markdown(
                "_No pretraining log was recorded with this encoder._", visible=curve is None
            )
            with gr.Accordion("Configuration", open=False):
                encoder_json = gr.Code(encoder_info.config_json(ctx), language="json")

        # The public API's endpoints hang on triggers the page never fires: an API caller gets a
        # refusal as an error, while the page's own events show it as a warning and keep their
        # outputs (app.events.guarded).
        api_search, api_classify = gr.Button(visible=False), gr.Button(visible=False)

        # --- Search wiring --------------------------------------------------------------------
        ev = Events(ctx)
        filters = [k, label, path_text, cutoff]
        results = [gallery, rows, status, hits]
        private = dict(api_visibility="private")

        api_search.click(ev.do_search, [query, *filters], results, api_name="search")
        new_query = dict(
            fn=ev.new_search, inputs=[query, *filters], outputs=[*results, selected, picked]
        )
        go.click(**new_query, **private)
        query.upload(
            ev.upload_search,
            [query, *filters],
            [*results, selected, picked, positives, negatives, fb, query],
            **private,
        )
        if ctx.example:
            demo.load(**new_query, **private)
        gallery.select(ev.select_result, [hits], [selected, picked], **private)
        from_btn.click(
            ev.search_from, [selected, query, *filters], [*results, query, picked], **private
        )
        feedback = [selected, positives, negatives]
        more.click(ev.mark_more, feedback, [positives, negatives, fb], **private)
        less.click(ev.mark_less, feedback, [positives, negatives, fb], **private)
        clear.click(ev.clear_examples, None, [positives, negatives, fb], **private)
        refine.click(
            ev.do_refine,
            [query, positives, negatives, *filters, selected],
            [*results, selected, picked],
            **private,
        )
        csv_btn.click(ev.export_csv, [hits], [download], **private)
        json_btn.click(ev.export_json, [hits], [download], **private)

        # --- Classify wiring ------------------------------------------------------------------
        api_classify.click(ev.do_classify, [cls_image, method], [top5, cls_md], api_name="classify")
        cls_image.upload(ev.show_upload, [cls_image], [cls_image], **private)
        cls_go.click(ev.classify_page, [cls_image, method], [top5, cls_md], **private)
        cls_tab.select(
            ev.follow_query, [query, cls_image, method], [cls_image, top5, cls_md], **private
        )
        train_go.click(
            ev.do_train,
            [source],
            [probe_md, confusion, method],
            **private,
            concurrency_id="train",
            concurrency_limit=1,
        )
        label_go.click(ev.label_image, [selected, new_label], [label_md], **private)

        # --- Collection wiring ----------------------------------------------------------------
        view = [  # Events._collection_view's outputs, in its order
            *(stats, hist, errors, title, label, method),
            *(encoder_md, loss_plot, no_log, encoder_json),
        ]
        index_go.click(
            ev.do_index,
            [folder, method],
            [index_md, *view],
            **private,
            concurrency_id="index",
            concurrency_limit=1,
        )
        demo.load(ev.page_load, [method], view, **private)
        dup_go.click(ev.find_duplicates, [thr], [dups], **private)
        map_go.click(ev.draw_map, None, [map_img, map_state], **private)
        map_img.click(ev.click_map, [map_state], [point_img, point_md], **private)
    return demo
