"""A real server on 127.0.0.1 driven by gradio_client and plain HTTP (no mocks)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from tests.app.conftest import as_shown

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server: Any) -> Client:
    return Client(server.local_url, verbose=False, download_files=False)


def search(client: Client, path: str | Path, k: int = 5) -> tuple[Any, list[dict], str]:
    return client.predict(handle_file(str(path)), k, "(any)", "", -1, api_name="/search")


def test_search_returns_k_results_query_first(client: Client, ctx: Any) -> None:
    gallery, rows, status = search(client, ctx.example, k=5)
    assert len(gallery) == len(rows) == 5
    assert rows[0]["path"] == os.path.realpath(ctx.example)
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert "5 results" in status


def test_classify_returns_labels(client: Client, ctx: Any) -> None:
    top, text = client.predict(handle_file(ctx.example), "knn", api_name="/classify")
    labels = {c["label"] for c in top["confidences"]}
    assert labels == {"circle", "square", "stripes"}
    assert "kNN" in text


@pytest.mark.parametrize("payload", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_bad_upload_gives_error_and_server_keeps_serving(
    client: Client, ctx: Any, tmp_path: Path, payload: bytes
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(payload)
    with pytest.raises(Exception, match=r"Cannot use bad\.png: (not an image|truncated)"):
        search(client, bad)
    assert len(search(client, ctx.example, k=3)[1]) == 3


def test_decompression_bomb_is_refused(client: Client, ctx: Any, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 Mpx, a few kB on disk
    assert bomb.stat().st_size < 100_000
    with pytest.raises(Exception, match="decompression bomb"):
        search(client, bomb)
    assert len(search(client, ctx.example, k=2)[1]) == 2


def test_upload_over_size_limit_is_refused(
    server: Any, client: Client, ctx: Any, tmp_path: Path
) -> None:
    from tests.app.queue_api import upload

    big = tmp_path / "big.bmp"
    Image.new("RGB", (800, 800)).save(big)  # ~1.9 MB > the fixture's 1mb limit
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        search(client, big)  # gradio_client checks the limit it was told
    with pytest.raises(urllib.error.HTTPError) as refused:  # and the server enforces it
        upload(server, str(big))
    assert refused.value.code == 413
    assert len(search(client, ctx.example, k=2)[1]) == 2


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def file_url(server: Any, path: str) -> str:
    return f"{server.local_url.rstrip('/')}/gradio_api/file={urllib.parse.quote(path)}"


def test_files_served_only_from_the_thumbnails(server: Any, ctx: Any, tmp_path: Path) -> None:
    _, _rows, _ = search(
        Client(server.local_url, verbose=False, download_files=False), ctx.example, k=1
    )
    thumbs = Path(ctx.served_dirs[0])
    shown = next(p for p in thumbs.rglob("*.png"))
    assert get(file_url(server, str(shown))) == 200
    root = Path(ctx.roots()[0])
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    link = thumbs / "zz_link_out.png"
    link.symlink_to(secret)
    try:
        refused = [
            str(secret),  # absolute, elsewhere
            "/etc/passwd",
            str(root / "circle" / "circle_00.png"),  # an original image
            str(thumbs / ".." / ".." / secret.relative_to(secret.parents[1])),  # ../ out
            f"{thumbs}/../meta.db",  # the database
            str(link),  # symlink out
            "../../../../etc/passwd",
            str(Path(ctx.path) / "manifest.json"),
        ]
        for p in refused:
            assert get(file_url(server, p)) in (403, 404), p
    finally:
        link.unlink()


def test_the_pages_refusals_are_warnings_that_keep_what_it_shows(
    server: Any, ctx: Any, tmp_path: Path
) -> None:
    """A refused page event sends a warning and leaves every output alone: a failed event would
    blank them all (the results, the query picture, the confusion matrix) under an "Error"
    badge. The public API still answers a refusal with an error."""
    from tests.app.queue_api import call, upload

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    not_image = upload(server, str(bad))
    filters = [5, "(any)", "", -1]
    refusals = {
        "search_from": ([None, None, *filters], "Click a result first"),
        "do_refine": ([None, [], [], *filters, None], "Mark a result"),
        "label_image": ([None, "cats"], "Select a result"),
        "new_search": ([not_image, *filters], "Cannot use notes.png: not an image"),
        "classify_page": ([not_image, "knn"], "Cannot use notes.png: not an image"),
        "do_train": (["ui"], "at least 2 classes"),  # no labels given here
    }
    for image_id in list(ctx.user_labels()):
        ctx.set_user_label(image_id, None)
    for name, (data, said) in refusals.items():
        reply = call(server, name, data)
        assert reply.success and reply.skipped, (name, reply.completed)
        assert len(reply.warnings) == 1 and said in reply.warnings[0], (name, reply.warnings)
    # Gradio rebuilds an output's component for the session when it is sent an update, which
    # would drop upload_image's decoding in handlers (then an opaque ComponentProcessingError)
    for first, then in (
        (("search_from", [None, None, *filters]), ("new_search", [not_image, *filters])),
        (("follow_query", [None, None, "knn"]), ("classify_page", [not_image, "knn"])),
    ):
        session = uuid.uuid4().hex
        assert call(server, *first, session=session).success
        reply = call(server, *then, session=session)
        assert reply.success and "Cannot use notes.png" in reply.warnings[0], reply.completed
    for name, data in (("do_search", [not_image, *filters]), ("do_classify", [not_image, "knn"])):
        reply = call(server, name, data)
        assert not reply.success and "Cannot use notes.png" in reply.error
    reply = call(server, "new_search", [upload(server, ctx.example), *filters])
    assert reply.success and not reply.warnings
    _gallery, rows, status, _hits, _selected, picked = reply.completed["output"]["data"]
    assert len(rows) == 5 and status.startswith("5 results") and picked.startswith("Click")


def test_indexing_from_the_page_updates_whatever_shows_the_collection(
    tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """After an index run the heading's count, the label filter, the classifiers and the
    histogram's range come from the new collection (they stayed as the page was built)."""
    from app.server import ServerConfig, launch
    from tests.app.queue_api import call
    from tests.conftest import free_port

    images = tree(tmp_path / "images", labels=("circle",), n=2)
    extra = tree(tmp_path / "extra", labels=("dots", "square"), n=3)
    ctx = own_ctx(images, allow_index=(extra,))
    demo = launch(ctx, ServerConfig(port=free_port()))
    try:
        reply = call(demo, "do_index", [str(extra), None])
        assert reply.success and not reply.warnings, reply.completed
        done, _stats, plot, _errors, heading, label, method, *_encoder = reply.completed["output"][
            "data"
        ]
        assert done.startswith("Done") and heading.endswith("· 8 images")
        assert [c[0] for c in label["choices"]] == ["(any)", "circle", "dots", "square"]
        assert [c[0] for c in method["choices"]] == ["knn"] and method["value"] == "knn"
        assert plot["y_lim"] == [0, 4]
    finally:
        demo.close()


def test_a_page_loaded_after_another_process_indexed_shows_the_collection_now(
    encoder_dir: Path, encoder_factory: Any, tmp_path: Path, own_ctx: Any, tree: Any
) -> None:
    """The UI stays up while the command line changes the collection (a nightly run that adds
    files, a re-embedding with a better encoder): a page loaded after shows the new count,
    labels and encoder, where it showed those the server started with until a restart."""
    from app.server import ServerConfig, launch
    from indexes import index_images
    from moco import read_encoder_config
    from tests.app.queue_api import call
    from tests.conftest import free_port

    images = tree(tmp_path / "images", labels=("circle",), n=2)
    ctx = own_ctx(images)
    demo = launch(ctx, ServerConfig(port=free_port()))
    try:
        tree(images, labels=("dots",), n=3)
        better = encoder_factory(tmp_path / "better", seed=5)
        cfg = json.loads((better / "config.json").read_text())  # a log: the tab draws a curve
        cfg["training"] = {"log": [{"epoch": 1, "loss": 6.0}, {"epoch": 2, "loss": 5.5}]}
        (better / "config.json").write_text(json.dumps(cfg))
        index_images([], tmp_path / "coll", better, workers=0, reembed=True)
        reply = call(demo, "page_load", [None])
        assert reply.success and not reply.warnings, reply.completed
        data = reply.completed["output"]["data"]
        _stats, _plot, _errors, heading, label, _method, encoder_md, curve, no_log, config = data
        assert heading.endswith("· 5 images")
        assert [c[0] for c in label["choices"]] == ["(any)", "circle", "dots"]
        new_hash = read_encoder_config(better).content_hash
        assert new_hash != read_encoder_config(encoder_dir).content_hash
        assert new_hash[:16] in encoder_md and new_hash[:16] in config
        assert str(better.resolve()) in as_shown(encoder_md)
        assert curve["visible"] is True and no_log["visible"] is False
        assert curve["value"]["data"] == [[1, 6.0], [2, 5.5]]
    finally:
        demo.close()


def test_a_fault_in_a_page_event_keeps_the_page_and_logs_the_traceback(
    tmp_path: Path, own_ctx: Any, tree: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only refusals: an unexpected exception (here the collection's database closed under
    the server) left every output blank under "Error". The page now keeps what it shows and
    says where the details are; the server's log has the traceback."""
    from app.server import ServerConfig, launch
    from tests.app.queue_api import call, upload
    from tests.conftest import free_port

    images = tree(tmp_path / "images", labels=("circle",), n=2)
    ctx = own_ctx(images)
    demo = launch(ctx, ServerConfig(port=free_port()))
    try:
        query = upload(demo, str(images / "circle" / "circle_00.png"))
        ctx.collection.close()  # a fault no user caused
        with caplog.at_level("ERROR"):
            reply = call(demo, "new_search", [query, 3, "(any)", "", -1])
        assert reply.success and reply.skipped, reply.completed
        said = reply.warnings[0]
        assert said.startswith("Something went wrong (") and "the server's log" in said
        assert "new_search failed" in caplog.text and "Traceback" in caplog.text
    finally:
        demo.close()
