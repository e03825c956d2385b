"""Handlers as plain functions on a real tiny collection (no server, no mocks)."""

from __future__ import annotations

import csv
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app import classifying, encoder_info, handlers, overview
from app.context import USER_PROBE
from app.handlers import UserError
from app.markup import code, md
from indexes import Hit
from tests.app.conftest import as_shown


def test_search_finds_the_query_first_with_captions(ctx: Any) -> None:
    r = handlers.search(ctx, ctx.example, k=5)
    assert len(r.hits) == len(r.gallery) == 5
    assert r.hits[0].path == os.path.realpath(ctx.example)
    assert r.hits[0].score == pytest.approx(1.0, abs=1e-4)
    path, cap = r.gallery[0]
    assert ctx.is_served(path) and Path(path).suffix == ".png"  # a thumbnail, not the original
    with Image.open(path) as shown, Image.open(ctx.example) as original:
        assert shown.size == original.size  # small images keep their pixels
        assert shown.tobytes() == original.convert("RGB").tobytes()
    assert cap == "query · circle_00.png"  # the query's own match; the folder is its label
    assert r.gallery[1][1] == f"{r.hits[1].score:.3f} · {Path(r.hits[1].relpath).name}"
    assert r.rows()[0]["rank"] == 1 and "ms" in r.status()


def test_search_accepts_a_pil_image_and_filters(ctx: Any) -> None:
    img = Image.open(ctx.example)
    only_square = handlers.search(ctx, img, k=24, label="square")
    assert {h.label for h in only_square.hits} == {"square"}
    by_path = handlers.search(ctx, img, k=24, path_text="stripes_0")
    assert by_path.hits and all("stripes_0" in h.relpath for h in by_path.hits)
    glob = handlers.search(ctx, img, k=24, path_text="circle/*_01.png")
    assert [h.relpath for h in glob.hits] == ["circle/circle_01.png"]
    cut = handlers.search(ctx, img, k=24, min_score=0.9999)
    assert all(h.score >= 0.9999 for h in cut.hits)


def test_an_empty_search_says_why(ctx: Any, tmp_path: Path, own_ctx: Any, tree: Any) -> None:
    img = Image.open(ctx.example)
    cases = {
        "path contains 'zzz'": dict(path_text="zzz"),
        "label 'square', path glob 'circle/\\*'": dict(label="square", path_text="circle/*"),
        "path contains 'stripes', score at least 0.9999": dict(
            path_text="stripes", min_score=0.9999
        ),
    }
    for said, filters in cases.items():
        r = handlers.search(ctx, img, k=5, **filters)
        assert not r.hits
        assert r.status().startswith("No results in ")
        assert r.status().endswith(f": no image passes the filters ({said}).")
    assert handlers.search(ctx, img, k=1).status().startswith("1 result in ")
    # images deleted since they were indexed cannot be shown: say so, not "0 results"
    images = tree(tmp_path / "images", labels=("circle",), n=2)
    gone = own_ctx(images)
    for f in (images / "circle").iterdir():
        f.unlink()
    status = handlers.search(gone, img, k=5).status()
    assert "the 2 images found can no longer be read" in status and "re-index" in status
    images.rename(tmp_path / "moved")  # the whole folder: the way to find it again
    move = f"moco-search index --collection {tmp_path / 'coll'} --move-root {images} NEW_PLACE"
    assert overview.stats_markdown(gone).endswith(  # Markdown: the paths as code, escaped
        f"Folders:\n- {code(images)} (gone; if it moved: {code(move)})"
    )
    assert (
        handlers.search(gone, img, k=5)
        .status()
        .endswith(
            f"the 2 images found can no longer be read: their folder {md(images)} is gone. If "
            f"it moved, {code(move)} keeps every id and label."
        )
    )


@pytest.mark.parametrize("cut", [float("nan"), "x", [0.5]])
def test_a_cut_off_that_is_no_number_is_a_user_error(ctx: Any, cut: Any) -> None:
    """NaN passed Gradio's slider check, and no score passes NaN: "no image passes"."""
    with pytest.raises(UserError, match="cut-off must be a number"):
        handlers.search(ctx, ctx.example, k=3, min_score=cut)


@pytest.mark.parametrize("k", [0, 101, "x", None])
def test_bad_k_is_a_user_error(ctx: Any, k: Any) -> None:
    with pytest.raises(UserError, match="k must"):
        handlers.search(ctx, ctx.example, k=k)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty file"),
        (b"not an image at all", "not an image"),
        (None, "truncated"),
    ],
)
def test_bad_uploads_are_user_errors(
    ctx: Any, tmp_path: Path, content: bytes | None, reason: str
) -> None:
    p = tmp_path / "up.png"
    if content is None:
        full = Path(ctx.example).read_bytes()
        content = full[: len(full) // 2]
    p.write_bytes(content)
    with pytest.raises(UserError, match=reason):
        handlers.search(ctx, str(p), k=3)
    with pytest.raises(UserError, match="Upload"):
        handlers.search(ctx, None, k=3)


def test_decompression_bomb_upload(ctx: Any, tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(p)
    with pytest.raises(UserError, match="decompression bomb"):
        handlers.decode_upload(ctx, str(p))


def test_an_uploaded_photo_is_decoded_as_it_was_indexed(
    tmp_path: Path, own_ctx: Any, tree: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An indexed JPEG uploaded again was decoded whole, where the indexer decodes at a reduced
    scale: on the demo encoder six 2000x1500 photos scored 0.99957 to 0.99997 against themselves,
    one under the 0.9999 at which the page marks a hit as the query. And a 48 MP phone photo was
    refused as a bomb, though decoding it at that scale takes a fraction of the pixels."""
    images = tree(tmp_path / "images", labels=("circle", "square"), n=2)
    photo = images / "circle" / "photo.jpg"
    big = Image.open(images / "circle" / "circle_00.png").convert("RGB").resize((640, 480))
    big.rotate(20).save(photo, quality=90)
    ctx = own_ctx(images)
    hit = handlers.search(ctx, str(photo), k=1).hits[0]
    assert hit.relpath == "circle/photo.jpg" and handlers.caption(hit).startswith("query · ")
    uploaded = ctx.collection.embed([handlers.decode_upload(ctx, str(photo))])[0]
    assert np.abs(uploaded - ctx.collection.vectors([hit.id])[0]).max() < 1e-6  # the same
    monkeypatch.setattr(handlers, "MAX_UPLOAD_PIXELS", 100_000)  # 640x480 stands for 48 MP
    assert handlers.search(ctx, str(photo), k=1).hits[0].relpath == "circle/photo.jpg"
    big.save(tmp_path / "photo.png")  # other formats keep the limit
    with pytest.raises(UserError, match="decompression bomb"):
        handlers.decode_upload(ctx, str(tmp_path / "photo.png"))


def test_an_upload_the_browser_cannot_draw_is_shown_as_a_picture_it_can(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """A scanner's TIFF (or an iPhone's HEIC) is searched whole and shown as a picture of at
    most SHOWN_SIDE pixels; searching that picture again still finds the scan as the query."""
    images = tree(tmp_path / "images", labels=("circle", "square"), n=2)
    scan = images / "square" / "scan.tif"
    Image.open(images / "square" / "square_01.png").convert("RGB").resize((3000, 2000)).save(scan)
    ctx = own_ctx(images)
    png = str(images / "circle" / "circle_00.png")
    assert handlers.for_browser(ctx, png) == (png, png)  # drawn as it is
    searched, shown = handlers.for_browser(ctx, str(scan))
    assert searched.size == (3000, 2000) and shown.size == (handlers.SHOWN_SIDE, 853)
    shown.save(tmp_path / "shown.png")  # what Gradio keeps and a new search reads
    for query in (str(scan), searched, str(tmp_path / "shown.png")):
        hit = handlers.search(ctx, query, k=1).hits[0]
        assert hit.relpath == "square/scan.tif" and handlers.caption(hit).startswith("query · ")
    (tmp_path / "notes.tif").write_text("not a scan")
    with pytest.raises(UserError, match=r"Cannot use notes\.tif"):
        handlers.for_browser(ctx, str(tmp_path / "notes.tif"))


def test_more_like_this_and_relevance_feedback(ctx: Any) -> None:
    first = handlers.search(ctx, ctx.example, k=6)
    hit = handlers.selected_hit(first.hits, 2)
    assert hit is first.hits[2]
    again = handlers.search_id(ctx, hit.id, k=4)
    assert again.hits[0].id == hit.id
    pos, neg = handlers.toggle([], hit.id, [])
    neg, pos = handlers.toggle([], first.hits[1].id, pos)
    assert pos == [hit.id] and neg == [first.hits[1].id]
    refined = handlers.search(ctx, ctx.example, k=24, positives=pos, negatives=neg)
    ranks = [h.id for h in refined.hits]
    assert first.hits[1].id not in ranks  # a "less like this" example is not shown again
    assert len(ranks) == 23 and hit.id in ranks
    assert refined.position(hit) == ranks.index(hit.id)  # the selection frame follows it
    text = as_shown(handlers.feedback_text(ctx, pos, neg))
    assert Path(hit.relpath).name in text and Path(first.hits[1].relpath).name in text
    assert handlers.caption(again.hits[0], query_id=hit.id).startswith("query · ")
    assert handlers.caption(again.hits[1], query_id=hit.id)[:5] == f"{again.hits[1].score:.3f}"
    assert handlers.toggle(pos, hit.id, [])[0] == []  # a second click removes it
    with pytest.raises(UserError):
        handlers.selected_hit([], 0)
    with pytest.raises(UserError, match="No result number 7"):
        handlers.selected_hit(first.hits, 6)
    picture = handlers.query_image(ctx, hit)
    with Image.open(hit.path) as original:
        assert picture.size == original.size


def test_export_csv_and_json(ctx: Any) -> None:
    r = handlers.search(ctx, ctx.example, k=3)
    rows = r.rows()
    with open(handlers.export(r.hits, "csv"), newline="") as f:
        got = list(csv.DictReader(f))
    assert [int(r["id"]) for r in got] == [r["id"] for r in rows]
    assert json.loads(Path(handlers.export(r.hits, "json")).read_text()) == rows
    with pytest.raises(UserError):
        handlers.export([], "csv")
    with pytest.raises(UserError):
        handlers.export(r.hits, "xml")


def test_only_thumbnails_are_served(ctx: Any, tmp_path: Path) -> None:
    root = Path(ctx.roots()[0])
    assert ctx.served_dirs == [os.path.realpath(ctx.thumbs)]
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    link = Path(ctx.thumbs) / "zz_out.png"
    link.symlink_to(outside)
    try:
        for p in [
            str(outside),
            "/etc/passwd",
            str(root / "circle" / "circle_00.png"),
            str(ctx.path / "meta.db"),
            str(link),
            str(ctx.thumbs) + "-other/x.png",
        ]:
            assert not ctx.is_served(p), p
    finally:
        link.unlink()
    blocked = ctx.blocked_paths()
    for name in ("meta.db", "manifest.json", "index.faiss", "probes", "app_labels.json"):
        assert os.path.realpath(ctx.path / name) in blocked
    assert os.path.realpath(ctx.thumbs) not in blocked


def test_ui_indexes_only_roots_and_allowed_folders(ctx: Any, tmp_path: Path, tree: Any) -> None:
    from app.context import AppContext

    allowed = tree(tmp_path / "allowed", labels=("circle",), n=1)
    other = tree(tmp_path / "other", labels=("circle",), n=1)
    for c in (ctx, AppContext(ctx.collection, allow_index=(allowed,))):
        assert c.check_index_folder(ctx.roots()[0]) == Path(ctx.roots()[0])  # refresh: always
        with pytest.raises(PermissionError, match="--allow-index"):
            c.check_index_folder(str(other))
        with pytest.raises(PermissionError):
            c.check_index_folder("/etc")
    c = AppContext(ctx.collection, allow_index=(allowed,))
    assert c.check_index_folder(str(allowed / "circle")) == (allowed / "circle").resolve()
    with pytest.raises(PermissionError):  # a symlink inside does not lead out
        (allowed / "out").symlink_to(other)
        c.check_index_folder(str(allowed / "out"))
    with pytest.raises(ValueError, match="Not a folder"):
        c.check_index_folder(str(allowed / "missing"))


def test_classify_knn_then_probe(ctx: Any) -> None:
    top, text = classifying.classify(ctx, ctx.example, "knn")
    assert text == "By a kNN vote among the labelled images (3 classes)."
    assert set(top) == {"circle", "square", "stripes"}
    assert sum(top.values()) == pytest.approx(1.0, abs=1e-4)
    res = classifying.train(ctx, "default")
    assert res.confusion_png and res.confusion_png.is_file()
    assert res.metrics.n == 24 and "default" in classifying.methods(ctx)
    top, text = classifying.classify(ctx, ctx.example)  # default: the probe
    assert len(top) == 3 and "linear probe" in text
    md, png = classifying.probe_summary(ctx, "default")
    assert "on 24 held-out images (5-fold cross-validation)" in md and png
    assert res.line().startswith("probe default: 3 classes, 24 labelled images; top-1 ")
    assert "*" not in res.line() and "`" not in res.line()  # plain text for the terminal
    with pytest.raises(UserError):
        classifying.classify(ctx, ctx.example, "nope")


def test_label_a_few_images_and_train_a_probe(ctx: Any) -> None:
    rows = {r.relpath: r for r in ctx.collection.query_records("images.status = 'ok'")}
    try:
        for name, lab in [
            ("circle/circle_00.png", "round"),
            ("circle/circle_01.png", "round"),
            ("square/square_00.png", "boxy"),
            ("square/square_01.png", "boxy"),
        ]:
            r = rows[name]
            msg = classifying.label_image(ctx, Hit.from_record(r, 1.0), lab)
            if name == "circle/circle_01.png":  # one kind so far: say how to go on
                with pytest.raises(UserError) as one_kind:
                    classifying.train(ctx, USER_PROBE)
                said = str(one_kind.value)
                assert "at least 2 classes" in said and "so far: round: 2." in said
                assert "label it below" in said
        assert "boxy: 2" in as_shown(msg) and "round: 2" in as_shown(msg)
        from indexes import Collection

        with Collection.open(ctx.path) as cli_view:  # what probe train / classify-all see
            ids, labels = cli_view.labeled()
            assert (
                dict(zip(ids.tolist(), labels, strict=True))[rows["circle/circle_00.png"].id]
                == "round"
            )
            assert len(ids) == 24 and labels.count("boxy") == 2
        assert not (ctx.path / "app_labels.json").exists()  # one owner: meta.db
        res = classifying.train(ctx, USER_PROBE)
        assert res.classes == ["boxy", "round"] and res.n_labeled == 4
        top, _ = classifying.classify(ctx, ctx.example, USER_PROBE)
        assert set(top) == {"boxy", "round"}
        with pytest.raises(UserError):
            classifying.label_image(ctx, None, "x")
    finally:
        for r in rows.values():
            ctx.set_user_label(r.id, None)


def test_labels_of_an_older_version_move_into_the_database(ctx: Any) -> None:
    old = ctx.path / "app_labels.json"
    first = ctx.collection.query_records("images.status = 'ok'")[0]
    old.write_text(json.dumps({str(first.id): "kept", "999999": "gone"}))
    try:
        assert ctx.user_labels() == {first.id: "kept"}  # an id no longer indexed is dropped
        assert not old.exists() and ctx.collection.user_labels() == {first.id: "kept"}
    finally:
        ctx.set_user_label(first.id, None)
    assert ctx.user_labels() == {}


def markup_left(markdown: str) -> str:
    """What of ``markdown`` the page would read as markup: escapes and code tags taken out."""
    return re.sub(r"</?code>", "", re.sub(r"\\.", "", markdown))


def test_file_names_and_labels_are_shown_as_text_not_markup(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """A label one user types, or a file named so in an indexed folder, reaches other users'
    pages as text: not an image fetched from any address, a link, or formatting."""
    import warnings

    from app.events import Events

    images = tree(tmp_path / "images", labels=("circle", "square"), n=2)
    name = "<img src=x> **b** [l](u) `c`.png"
    Image.open(images / "circle" / "circle_00.png").save(images / "circle" / name)
    c = own_ctx(images)
    hostile = "<img src=http://t.example/t> [l](http://t.example) ~~s~~ $$x$$"
    hit = handlers.search(c, str(images / "circle" / name), k=1).hits[0]
    other = handlers.search(c, str(images / "square" / "square_00.png"), k=1).hits[0]
    labelled = classifying.label_image(c, hit, hostile)
    classifying.label_image(c, other, "boxy")
    res = classifying.train(c, USER_PROBE)
    hit = handlers.search(c, str(images / "circle" / name), k=1).hits[0]
    texts = {
        "label": labelled,
        "selection": handlers.selection_text(hit),
        "feedback": handlers.feedback_text(c, [hit.id], []),
        "probe": classifying.trained_markdown(res),
        "index": Events(c).do_index("", "knn")[0],
    }
    for what, text in texts.items():
        left = markup_left(text)
        assert not re.search(r"[<>\[\]`$~]", left), (what, text)
    assert name in as_shown(texts["selection"]) and name in as_shown(texts["feedback"])
    assert hostile in as_shown(labelled) and name in as_shown(labelled)
    with warnings.catch_warnings(record=True) as said:  # a refusal naming it: HTML, escaped
        warnings.simplefilter("always")
        Events(c).classify_page(str(images / "circle" / name), "<img src=x>")
    assert "&lt;img src=x&gt;" in str(said[0].message) and "<img" not in str(said[0].message)


def test_overview_stats_map_and_duplicates(ctx: Any) -> None:
    assert "24 images indexed" in overview.stats_markdown(ctx)
    hist = overview.label_histogram(ctx)
    assert dict(zip(hist["label"], hist["images"], strict=True)) == {
        "circle": 8,
        "square": 8,
        "stripes": 8,
    }
    m = overview.embedding_map(ctx)
    assert len(m.ids) == 24 and m.image.size[0] > 0
    x, y = m.xy[5]
    assert m.nearest(x + 1, y - 1) is not None
    assert m.nearest(-100, -100) is None
    ids = ctx.collection.labeled()[0]
    vecs = ctx.collection.vectors(ids)
    top = float(np.sort((vecs @ vecs.T)[np.triu_indices(len(ids), 1)])[-1])
    rows = overview.duplicate_rows(ctx, top - 1e-4)  # the most similar pair, at least
    assert rows and rows[0][0] >= 2 and float(rows[0][1]) >= top - 1e-3
    assert overview.duplicate_rows(ctx, min(1.0, top + 1e-3)) == []  # no pair is that close
    assert overview.error_rows(ctx) == []


def test_encoder_info(ctx: Any) -> None:
    assert "resnet18" in encoder_info.encoder_markdown(ctx)
    assert "avg pooling, not centred" in encoder_info.encoder_markdown(ctx)
    fit = {"kind": "center", "images": 12, "folder": "/pics"}
    assert encoder_info.fitted(fit) == "centred on 12 files of `/pics`"
    assert encoder_info.loss_curve(ctx) is None  # the test encoder has no training log
    assert json.loads(encoder_info.config_json(ctx))["encoder"]["arch"] == "resnet18"


def test_encoder_info_counts_epochs_from_a_thinned_log(ctx: Any, tmp_path: Path) -> None:
    """An export keeps a long run's log thinned (``moco.trainlog.thin_log``): the tab counts
    the run's epochs from the last row's epoch, not from the rows kept."""
    import shutil
    from types import SimpleNamespace

    enc = dict(ctx.collection.manifest["encoder"])
    trained = shutil.copytree(enc["path"], tmp_path / "enc")
    config = json.loads((trained / "config.json").read_text())
    log = [{"epoch": e, "loss": 7.0 - e / 1000} for e in (1, 10, 500, 2000)]
    config["training"] = {"log": [*log, {"epoch": 2189, "loss": 4.5, "knn_top1": 68.1}]}
    (trained / "config.json").write_text(json.dumps(config))
    view = SimpleNamespace(
        collection=SimpleNamespace(manifest={"encoder": {**enc, "path": trained}})
    )
    text = encoder_info.encoder_markdown(view)
    assert "pretraining: 2189 epochs; last loss 4.5000, kNN top-1 68.1%" in text
    curve = encoder_info.loss_curve(view)
    assert list(curve["epoch"]) == [1, 10, 500, 2000, 2189]


def test_index_update_in_background_while_searching(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """Add a folder while searches run: none fails, and the new images appear after reload."""
    write_tree = tree
    images = write_tree(tmp_path / "images", labels=("circle", "square"), n=3)
    extra = write_tree(tmp_path / "extra", labels=("dots",), n=4)
    ctx = own_ctx(images, allow_index=(extra,))
    ctx.example = str(images / "circle" / "circle_00.png")
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                assert handlers.search(ctx, ctx.example, k=3).hits
            except BaseException as e:
                errors.append(e)

    t = threading.Thread(target=hammer)
    t.start()
    from app.context import IndexJob

    ctx.job = IndexJob(folder="another run")  # one that has not finished
    with pytest.raises(ValueError, match="already going on"):
        ctx.start_index(str(extra))
    ctx.job = None
    job = ctx.start_index(str(extra))
    for _ in range(600):
        if job.finished:
            break
        threading.Event().wait(0.1)
    stop.set()
    t.join()
    assert job.finished and job.message.startswith("Done"), job.message
    assert not errors, errors[:1]
    assert len(ctx.collection) == 10
    hits = handlers.search(ctx, str(extra / "dots" / "dots_00.png"), k=1).hits
    assert hits[0].label == "dots" and ctx.shown_file(hits[0].path, hits[0].meta)
    with pytest.raises(PermissionError, match="not allowed"):
        ctx.start_index(str(tmp_path / "missing"))


def test_ui_index_run_keeps_to_the_allowed_folders(tmp_path: Path, own_ctx: Any, tree: Any) -> None:
    """``--allow-index`` lets the UI index a folder, not what its symlinks lead to: a linked
    folder or file outside is recorded as an error, never embedded or shown; a link that stays
    inside is indexed. The command line keeps following links (its user chose the folder)."""
    from indexes.scan import OUTSIDE

    images = tree(tmp_path / "images", labels=("circle",), n=2)
    allowed = tree(tmp_path / "allowed", labels=("dots",), n=2)
    private = tree(tmp_path / "private", labels=("secret",), n=2)
    (allowed / "evil").symlink_to(private / "secret")
    (allowed / "dots" / "one.png").symlink_to(private / "secret" / "secret_00.png")
    (allowed / "raw").mkdir()  # passed over as a .dat file, indexed through an inside link
    Image.new("RGB", (48, 40), (9, 99, 9)).save(allowed / "raw" / "pic.dat", "PNG")
    (allowed / "dots" / "alias.png").symlink_to(allowed / "raw" / "pic.dat")
    ctx = own_ctx(images, allow_index=(allowed,))
    job = ctx.start_index(str(allowed))
    for _ in range(600):
        if job.finished:
            break
        threading.Event().wait(0.1)
    assert job.message.startswith("Done") and f"{OUTSIDE}: 3" in job.message, job.message
    relpaths = {r.relpath for r in ctx.collection.query_records("images.status = 'ok'")}
    assert relpaths == {
        "circle/circle_00.png",
        "circle/circle_01.png",
        "dots/dots_00.png",
        "dots/dots_01.png",
        "dots/alias.png",
    }
    hits = handlers.search(ctx, str(private / "secret" / "secret_00.png"), k=10).hits
    assert not [h for h in hits if "secret" in h.path or h.relpath in ("dots/one.png",)]
    from indexes import index_images

    index_images([allowed], tmp_path / "coll", workers=0)  # the command line follows them
    ok = {r.relpath for r in ctx.collection.query_records("images.status = 'ok'")}
    assert {"dots/one.png", "evil/secret_01.png"} <= ok  # (evil/secret_00.png: its copy)


def test_ui_index_run_while_the_command_line_indexes_is_refused_in_a_line(
    tmp_path: Path, own_ctx: Any, tree: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The Collection tab's re-scan while ``moco-search index`` runs on the collection: the job
    says another process is indexing it, the server logs one line (no traceback), and nothing
    changes; once that run is over the same click works."""
    from tests.indexes.test_runlock import hold

    images = tree(tmp_path / "images", labels=("circle", "square"), n=3)
    ctx = own_ctx(images)
    tree(images, labels=("dots",), n=2)

    def finished(job: Any) -> Any:
        for _ in range(600):
            if job.finished:
                return job
            threading.Event().wait(0.1)
        raise AssertionError("the index job did not finish")

    try:
        holder = hold(tmp_path / "coll")
        try:
            job = finished(ctx.start_index(None))
        finally:
            holder.kill()
            holder.wait()
        assert job.message.startswith("Index run refused: Collection "), job.message
        assert f"being indexed by another process (pid {holder.pid})" in job.message
        assert "Traceback" not in caplog.text and len(ctx.collection) == 6
        assert finished(ctx.start_index(None)).message.startswith("Done")
        assert len(ctx.collection) == 8
    finally:
        ctx.collection.close()


def test_the_ui_follows_a_command_line_index_run_without_a_restart(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """``moco-search index`` (a nightly job) re-indexes the collection a running UI serves:
    removed images no longer come back (the first search after such a run raised ``KeyError``,
    "Something went wrong" in the page until a restart), new ones are found, and the kNN
    classifier votes with the labels the collection has now."""
    from indexes import index_images

    images = tree(tmp_path / "images", labels=("circle", "square"), n=3)
    ctx = own_ctx(images)
    query = str(images / "square" / "square_00.png")
    assert len(handlers.search(ctx, query, k=6).hits) == 6
    assert ctx.classifier("knn").classes == ["circle", "square"]
    for f in (images / "circle").iterdir():
        f.unlink()
    tree(images, labels=("dots",), n=2)
    index_images([], tmp_path / "coll", workers=0)  # as the command line would
    hits = handlers.search(ctx, query, k=6).hits
    assert sorted(h.label for h in hits) == ["dots", "dots", "square", "square", "square"]
    assert ctx.classifier("knn").classes == ["dots", "square"]


def test_a_probe_retrained_by_the_command_line_is_used_without_a_restart(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """``moco-search probe train`` beside a running UI: the UI kept classifying with the probe it
    had loaded first until it was restarted."""
    from indexes import Collection
    from indexes.classify import train_probe

    images = tree(tmp_path / "images", labels=("circle", "square"), n=4)
    ctx = own_ctx(images)
    with Collection.open(tmp_path / "coll") as cli:  # the command line's own process
        ids, labels = cli.labeled()
        train_probe(cli, ids, labels, name="mine", folds=2)
        assert ctx.classifier("mine").classes == ["circle", "square"]
        assert ctx.classifier("mine") is ctx.classifier("mine")  # cached while unchanged
        renamed = ["round" if v == "circle" else v for v in labels]
        train_probe(cli, ids, renamed, name="mine", folds=2)
    assert ctx.classifier("mine").classes == ["round", "square"]


def test_picks_that_an_index_run_removed_since_are_a_sentence(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """Search, select a result, mark examples; then an index run removes those images (their
    files were deleted). Every action on the page's old picks raised a KeyError (a bare "Error"
    in the browser); each now says what happened and what to do."""
    from indexes import index_images

    images = tree(tmp_path / "images", labels=("circle", "square"), n=3)
    ctx = own_ctx(images)
    query = str(images / "square" / "square_00.png")
    picked = next(h for h in handlers.search(ctx, query, k=6).hits if "circle" in h.relpath)
    for f in (images / "circle").iterdir():
        f.unlink()
    index_images([], tmp_path / "coll", workers=0)
    ctx.collection.reload()
    for act in (
        lambda: handlers.search_id(ctx, picked.id),
        lambda: handlers.search(ctx, query, k=3, positives=[picked.id]),
        lambda: handlers.search(ctx, query, k=3, negatives=[picked.id]),
        lambda: handlers.feedback_text(ctx, [picked.id], []),
        lambda: classifying.label_image(ctx, picked, "round"),
    ):
        with pytest.raises(UserError, match=r"no longer in the collection .* search again"):
            act()
    assert len(handlers.search(ctx, query, k=6).hits) == 3  # the new results are fine


def test_large_results_are_shown_as_thumbnails_kept_in_the_collection(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    images = tree(tmp_path / "images", labels=("circle",), n=3)
    big = images / "circle" / "big.jpg"
    Image.new("RGB", (1200, 800), (200, 30, 30)).save(big, quality=95)
    c = own_ctx(images)
    r = handlers.search(c, str(big), k=4)
    tiles = dict(zip([h.relpath for h in r.hits], [p for p, _ in r.gallery], strict=True))
    thumb = Path(tiles["circle/big.jpg"])
    assert thumb.parent.parent == tmp_path / "coll" / "thumbs" and thumb.suffix == ".webp"
    with Image.open(thumb) as im:
        assert max(im.size) == 320 and im.size[0] / im.size[1] == pytest.approx(1.5, 0.01)
    assert c.is_served(str(thumb))
    small = images / "circle" / "circle_00.png"
    kept = Path(tiles["circle/circle_00.png"])  # 48x40: lossless, at its own size
    assert c.is_served(str(kept)) and kept.suffix == ".png"
    made = thumb.stat().st_mtime_ns
    handlers.search(c, str(big), k=4)
    assert thumb.stat().st_mtime_ns == made  # reused, not redrawn
    big.unlink()  # gone since indexing: the cached thumbnail still shows the result
    assert handlers.search(c, str(small), k=4).gallery


def test_a_file_swapped_since_indexing_is_not_shown(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """A thumbnail shows only the bytes that were indexed: an indexed file replaced by a link to
    a picture outside every root (or edited) is left out and counted, and nothing of the other
    picture is cached under the indexed image's hash."""
    images = tree(tmp_path / "images", labels=("circle",), n=3)
    c = own_ctx(images)
    swapped = images / "circle" / "circle_01.png"
    original = tmp_path / "original.png"
    swapped.rename(original)
    private = tmp_path / "private.png"
    Image.new("RGB", (48, 40), (0, 255, 0)).save(private)
    swapped.symlink_to(private)
    r = handlers.search(c, str(original), k=3)
    assert "circle/circle_01.png" not in [h.relpath for h in r.hits] and len(r.hits) == 2
    assert r.status().endswith(
        "(1 more not shown: changed, moved or deleted since indexed; index the collection again)"
    )
    for made in (tmp_path / "coll" / "thumbs").rglob("*.*"):
        with Image.open(made) as im:
            assert im.convert("RGB").getpixel((0, 0)) != (0, 255, 0), made
    swapped.unlink()
    original.rename(swapped)  # the indexed bytes again: shown, as they were indexed
    r = handlers.search(c, str(swapped), k=3)
    assert r.hits[0].relpath == "circle/circle_01.png" and r.unshown == 0
    with Image.open(r.gallery[0][0]) as shown, Image.open(swapped) as im:
        assert shown.tobytes() == im.convert("RGB").tobytes()


def test_selection_and_examples_follow_what_is_shown(ctx: Any) -> None:
    """A refine that no longer shows the selected result unselects it ("Search from this one"
    searched from a picture no longer on show); a new upload starts with no examples marked
    for the old picture, and its tiles with none framed."""
    from app.events import NO_PICK, Events

    ev = Events(ctx)
    picked = handlers.search(ctx, ctx.example, k=5).hits[2]
    gone = ev.do_refine(ctx.example, [], [picked.id], 5, None, None, None, picked)
    assert picked.id not in [h.id for h in gone[3]] and gone[4:] == (None, NO_PICK)
    kept = ev.do_refine(ctx.example, [picked.id], [], 5, None, None, None, picked)
    assert kept[3][kept[0].selected_index].id == picked.id and kept[4] is picked
    fresh = ev.upload_search(ctx.example, 5, None, None, None)
    assert fresh[0].selected_index is None and fresh[4:6] == (None, NO_PICK)
    assert fresh[6:9] == ([], [], handlers.feedback_text(ctx, [], []))
    assert ev.new_search(ctx.example, 5, None, None, None)[0].selected_index is None


def test_build_demo_wires_every_event_without_a_server(ctx: Any) -> None:
    """The page builds with no server running; only search and classify are public API, and
    every event runs a method of ``Events`` (the queue API's names)."""
    from app.events import Events
    from app.ui import build_demo

    demo = build_demo(ctx)
    fns = list(demo.fns.values())
    public = sorted(f.api_name for f in fns if f.api_visibility == "public")
    assert public == ["classify", "search"]
    names = {getattr(f.fn, "__name__", None) for f in fns}
    handlers_ = {n for n in dir(Events) if not n.startswith("_")}
    assert handlers_ <= names, sorted(handlers_ - names)


def test_the_map_html_escapes_names_and_a_click_is_found_on_the_server(ctx: Any) -> None:
    import gradio as gr

    from app.events import Events

    m = overview.embedding_map(ctx)
    page = m.html()
    assert page.count("<circle") == 24 and page.count("<title>") == 24
    assert all(f"<title>{name}</title>" in page for name in m.names)
    hostile = overview.EmbeddingMap(m.image, m.ids[:1], m.xy[:1], ('<img src=x onerror="a()">',))
    assert "<img src=x" not in hostile.html() and "&lt;img src=x" in hostile.html()
    ev = Events(ctx)
    x, y = m.xy[2]
    _, text = ev.click_map(m, gr.EventData(None, {"x": x + 1.0, "y": y}))
    assert m.names[2] in as_shown(text)
    for bad in ({"x": "a", "y": 1}, {"x": 1e9, "y": 1e9}, {}, None):  # whatever a client sends
        assert ev.click_map(m, gr.EventData(None, bad))[1].startswith("No point there")
