"""Attacks on a live server, replayed through the queue API as plain HTTP (docs/ui.md "Security").

Each secret below is a file the server can read but must never serve: under its working
directory, under the temp directory, an ``.svg`` elsewhere (Gradio inlines those), another
collection's database, and a non-image lying in an indexed folder. Every event that ever took a
path, record or id list from the client is replayed with the secret's path in it; the secret's
bytes must appear in no reply and in no file the reply points to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.queue_api import Reply, call, get, upload
from tests.conftest import free_port

pytestmark = pytest.mark.slow
TOKEN = f"moco-search-secret-{uuid.uuid4().hex}"


def fake_hit(path: str) -> dict[str, Any]:
    return {"rank": 1, "id": 1, "score": 1.0, "label": None, "path": path, "relpath": path}


@pytest.fixture(scope="module")
def secrets(
    tmp_path_factory: pytest.TempPathFactory, ctx: Any, encoder_dir: Path, tree: Any
) -> Iterator[dict[str, Path]]:
    from indexes import index_images

    made: dict[str, Path] = {}
    made["cwd"] = Path.cwd() / f"secret-{uuid.uuid4().hex}.txt"
    made["tmp"] = Path(tempfile.gettempdir()) / f"secret-{uuid.uuid4().hex}.txt"
    elsewhere = Path.home() / ".cache" / f"moco-search-test-{uuid.uuid4().hex}"
    elsewhere.mkdir(parents=True)
    made["svg"] = elsewhere / "secret.svg"
    for p in made.values():
        p.write_text(f"<svg xmlns='http://www.w3.org/2000/svg'><text>{TOKEN}</text></svg>")
    other = tmp_path_factory.mktemp("other")
    tree(other / TOKEN, labels=("circle",), n=2)  # its meta.db holds the folder's name
    index_images([other / TOKEN], other / "coll", encoder_dir, workers=0)
    made["other meta.db"] = other / "coll" / "meta.db"
    root = Path(ctx.roots()[0])
    made["in a root"] = root / "circle" / "notes.txt"
    made["in a root"].write_text(TOKEN)
    yield made
    for key in ("cwd", "tmp", "in a root"):
        made[key].unlink(missing_ok=True)
    shutil.rmtree(elsewhere, ignore_errors=True)


def assert_no_secret(server: Any, reply: Reply) -> None:
    assert TOKEN.encode() not in reply.raw
    for url in reply.urls():
        assert TOKEN.encode() not in get(server, url)[1], url


def searched_session(server: Any, ctx: Any) -> str:
    """A session that has run one real search, so it has hits of its own."""
    session = uuid.uuid4().hex
    query = upload(server, ctx.example)
    reply = call(server, "do_search", [query, 5, "(any)", "", -1], session=session)
    assert reply.success, reply.error
    return session


SECRETS = ["cwd", "tmp", "svg", "other meta.db", "in a root"]
EVENTS = {
    # the gallery click took the hit rows from the client (in a session with hits, and without)
    "click after a search": ("select_result", lambda p: [[fake_hit(p)]], True),
    "click": ("select_result", lambda p: [[fake_hit(p)]], False),
    "search from it": (
        "search_from",
        lambda p: [fake_hit(p), file_data(p), 5, "(any)", "", -1],
        True,
    ),
    # downloads wrote the client's rows; labelling took the client's hit
    "download": ("export_csv", lambda p: [[fake_hit(p)]], True),
    "label": ("label_image", lambda p: [fake_hit(p), "x"], False),
    # a client-named file as an image input
    "classify the query": ("follow_query", lambda p: [file_data(p), file_data(p), "knn"], False),
    "the Classify box": ("follow_query", lambda p: [None, file_data(p), "knn"], False),
    "search": ("do_search", lambda p: [file_data(p), 5, "(any)", "", -1], False),
    # uploads are sent back to their box (a picture the browser draws, or as they are)
    "upload": ("upload_search", lambda p: [file_data(p), 5, "(any)", "", -1], False),
    "the Classify upload": ("show_upload", lambda p: [file_data(p)], False),
    "classify": ("do_classify", lambda p: [file_data(p), "knn"], False),
    # indexing the secret's folder from the UI
    "index": ("do_index", lambda p: [str(Path(p).parent), "knn"], False),
}


def file_data(path: str) -> dict[str, Any]:
    return {"path": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.parametrize("event", list(EVENTS))
@pytest.mark.parametrize("which", SECRETS)
def test_no_event_serves_a_file_the_client_names(
    server: Any, ctx: Any, secrets: dict[str, Path], which: str, event: str
) -> None:
    path = str(secrets[which])
    assert TOKEN.encode() in Path(path).read_bytes()  # the secret is real and readable
    name, data, after_search = EVENTS[event]
    session = searched_session(server, ctx) if after_search else None
    reply = call(server, name, data(path), {"index": 0, "value": None}, session=session)
    assert_no_secret(server, reply)
    status, body = get(server, path)
    assert status in (403, 404) and TOKEN.encode() not in body
    assert os.path.realpath(Path(path).parent) not in ctx.roots() or which == "in a root"


def test_a_click_shows_the_servers_own_hit(server: Any, ctx: Any, secrets: dict[str, Path]) -> None:
    session = searched_session(server, ctx)
    fake = fake_hit(str(secrets["tmp"]))
    reply = call(server, "select_result", [[fake]], {"index": 0, "value": None}, session=session)
    assert reply.success, reply.error
    reply = call(server, "search_from", [fake, None, 3, "(any)", "", -1], session=session)
    assert reply.success, reply.error
    _gallery, rows, _status, *_ = reply.completed["output"]["data"]
    assert rows[0]["path"] == os.path.realpath(ctx.example)  # the real first hit, not the fake
    for url in reply.urls():
        status, body = get(server, url)
        assert status == 200 and body  # thumbnails and the query picture are served


def test_indexing_from_the_ui_needs_allow_index(
    server: Any, ctx: Any, tmp_path: Path, tree: Any
) -> None:
    folder = tree(tmp_path / "new", labels=("circle",), n=2)
    manifest = (ctx.path / "manifest.json").read_bytes()
    db_size = (ctx.path / "meta.db").stat().st_size
    for target in ("/etc", str(folder)):
        reply = call(server, "do_index", [target, "knn"])
        assert reply.skipped and len(reply.warnings) == 1  # the page keeps what it shows
        assert "not allowed" in reply.warnings[0] and "--allow-index" in reply.warnings[0]
    assert (ctx.path / "manifest.json").read_bytes() == manifest  # nothing written
    assert (ctx.path / "meta.db").stat().st_size == db_size
    status, _ = get(server, "/etc/passwd")
    assert status == 403


def test_only_thumbnails_are_served_not_the_image_folders(server: Any, ctx: Any) -> None:
    root = Path(ctx.roots()[0])
    original = root / "circle" / "circle_00.png"
    assert get(server, str(original))[0] in (403, 404)  # an indexed image, but not a thumbnail
    hits = ctx.collection.search(str(original), k=1)
    shown = ctx.shown_file(hits[0].path, hits[0].meta)
    assert shown and Path(shown).is_relative_to(ctx.thumbs)
    status, body = get(server, shown)
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_collection_inside_its_root_keeps_its_files(
    tmp_path: Path, encoder_dir: Path, tree: Any
) -> None:
    from app.context import AppContext
    from app.server import ServerConfig, launch
    from indexes import index_images

    images = tree(tmp_path / "images", labels=("circle", "square"), n=3)
    coll = images / "collection"
    index_images([images], coll, encoder_dir, workers=0)
    ctx = AppContext.open(coll)
    demo = launch(ctx, ServerConfig(port=free_port()))
    try:
        query = upload(demo, str(images / "circle" / "circle_00.png"))
        reply = call(demo, "do_search", [query, 3, "(any)", "", -1])
        assert reply.success, reply.error
        tiles = reply.urls()
        assert tiles and all(get(demo, u)[0] == 200 for u in tiles)
        for name in ("meta.db", "manifest.json", "index.faiss"):
            status, _body = get(demo, str(coll / name))
            assert status in (403, 404), name
    finally:
        demo.close()
        ctx.collection.close()


@pytest.mark.parametrize("threshold", ["x", -5, 1e9])
def test_a_threshold_the_page_never_sends_is_refused(server: Any, threshold: Any) -> None:
    """The duplicates slider's range (0.8-1) is enforced by Gradio before the handler runs."""
    reply = call(server, "find_duplicates", [threshold])
    assert not reply.success and not reply.urls()
