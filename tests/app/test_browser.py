"""The UI in a real browser: Playwright driving Debian's Chromium against a live server.

Skipped with a reason when /usr/bin/chromium is missing, unless MOCO_SEARCH_REQUIRE_BROWSER=1
(set by CI), where a missing browser is a failure.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.screenshots import ARGS, CHROMIUM  # one set of browser flags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page() -> Any:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("MOCO_SEARCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing and MOCO_SEARCH_REQUIRE_BROWSER=1")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium) - browser test skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()


def captions(page: Any) -> list[str]:
    return page.locator("#results img").evaluate_all("els => els.map(e => e.alt || '')")


def test_upload_search_click_screenshot(page: Any, server: Any, ctx: Any, tmp_path: Path) -> None:
    page.goto(server.local_url)
    gallery = page.locator("#results")
    # the example query is searched on load
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    query = str(Path(ctx.roots()[0]) / "square" / "square_03.png")
    page.locator("input[type=file]").first.set_input_files(query)
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].some(i => i.alt && "
        "i.alt.includes('square_03'))"
    )
    assert captions(page)[0] == "query · square_03.png"  # its own match, marked
    # the 48x40 query is drawn across its box (Gradio drew one smaller than its box at 48 px)
    frame = Image.open(io.BytesIO(page.locator(".fit-box .image-frame").first.screenshot()))
    row = np.asarray(frame.convert("RGB")).astype(int)[frame.height // 2]  # across the middle
    drawn = np.flatnonzero(abs(row - 255).sum(-1) > 60)  # columns off the box's white
    assert drawn.size and drawn[-1] - drawn[0] > 0.8 * frame.width > 150
    page.locator("#results img").nth(1).click()
    page.wait_for_function("document.querySelector('#picked').innerText.includes('Selected')")
    page.locator("#from-btn").click()
    page.wait_for_function("document.body.innerText.includes('Searching from')")
    # the selected result is now the query picture; searching from it is an ordinary upload
    k = page.locator("input[type=number]").first  # k: 7, so that the new status differs
    k.fill("7")
    k.press("Enter")
    page.locator("#search-btn").click()
    page.wait_for_function(
        "document.querySelector('#search-status').innerText.includes('7 results in')"
    )
    assert "Error" not in page.inner_text("body")
    for src in gallery.locator("img").evaluate_all("els => els.map(e => e.src)"):
        assert "/thumbs/" in src  # every tile is a thumbnail, never an original
    shot = tmp_path / "search.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_less_like_this_then_refine_and_classify_follows(page: Any, server: Any) -> None:
    page.goto(server.local_url)
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    query_src = page.locator("img").first.get_attribute("src")
    before = captions(page)
    name = before[1].split(" · ")[1]  # result 2, "A"
    page.locator("#results img").nth(1).click()
    page.wait_for_function("document.querySelector('#picked').innerText.includes('Selected')")
    page.locator("#less-btn").click()
    page.wait_for_function(f"document.querySelector('#feedback').innerText.includes('{name}')")
    assert page.locator("img").first.get_attribute("src") == query_src  # marking: same query
    page.locator("#refine-btn").click()
    page.wait_for_function(
        f"![...document.querySelectorAll('#results img')].some(i => i.alt.includes('{name}'))"
    )
    after = captions(page)
    assert len(after) == 12 and not any(name in c for c in after)
    # the Classify tab opens on the current query, already classified
    page.get_by_role("tab", name="Classify").click()
    page.wait_for_function("document.body.innerText.includes('(3 classes).')")
    assert "circle" in page.inner_text("#top5")


def test_refusals_say_why_once_and_keep_the_results(page: Any, server: Any, tmp_path: Path) -> None:
    """A refused click or upload is a warning; the results, status, query picture and
    selection stay on show (a raised gr.Error blanked them all under "Error" badges)."""
    page.goto(server.local_url)
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    status = page.inner_text("#search-status")
    assert "results in" in status
    page.locator("#from-btn").click()  # nothing selected yet
    page.wait_for_function("document.body.innerText.includes('Click a result first')")
    page.locator("#results img").nth(1).click()
    page.wait_for_function("document.querySelector('#picked').innerText.includes('Selected')")
    picked = page.inner_text("#picked")
    bad = tmp_path / "notimage.png"
    bad.write_text("this is not an image")
    page.locator("input[type=file]").first.set_input_files(str(bad))
    page.wait_for_function("document.body.innerText.includes('Cannot use notimage.png')")
    page.wait_for_timeout(500)
    assert page.locator("#results img").count() >= 12
    assert page.inner_text("#search-status") == status and page.inner_text("#picked") == picked
    body = page.inner_text("body")
    assert body.count("notimage.png") == 1 and "gradio" not in body.split("Cannot use")[1][:80]
    assert "Error" not in body  # no badge over the results, the query or the status


def test_the_map_names_each_point_on_hover_and_opens_it_on_click(page: Any, server: Any) -> None:
    page.goto(server.local_url)
    page.get_by_role("tab", name="Collection").click()
    page.get_by_role("button", name="Draw the embedding map (PCA)").click()
    page.wait_for_function("document.querySelectorAll('#map svg circle').length === 24")
    # every point's hover text (its SVG title) is the file it stands for
    titles = page.locator("#map svg circle title").evaluate_all(
        "els => els.map(e => e.textContent)"
    )
    assert len(set(titles)) == 24 and all(t.endswith(".png") and "/" in t for t in titles)
    page.locator("#map svg circle").nth(3).click(force=True)  # the PNG lies under it
    page.wait_for_function(
        f"document.body.innerText.includes({titles[3]!r}) && "
        "document.body.innerText.includes('label:')"
    )
    assert titles[3].split("/")[0] in page.inner_text("body")  # its label, the folder name


def drawn_width(page: Any, box: str) -> int:
    """How wide the browser drew the picture in ``box`` (0: it could not decode the file)."""
    img = page.locator(f"{box} .image-frame img").first
    return int(img.evaluate("i => i.complete ? i.naturalWidth : 0"))


def test_a_heic_upload_is_drawn_searched_and_classified(
    page: Any, server: Any, ctx: Any, tmp_path: Path
) -> None:
    """A phone's HEIC is searched and shown: browsers (Chromium, Firefox) draw no HEIC, so the
    query box showed a broken picture beside the right results."""
    heif = pytest.importorskip("pillow_heif")  # in the test extra; a user's may lack it
    with Image.open(Path(ctx.roots()[0]) / "square" / "square_03.png") as im:
        photo = tmp_path / "IMG_0001.heic"
        heif.from_pillow(im.convert("RGB").resize((480, 400))).save(photo, quality=95)
        other = tmp_path / "IMG_0002.heic"
        heif.from_pillow(im.convert("RGB").resize((360, 300))).save(other, quality=95)
    page.goto(server.local_url)
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    page.locator("input[type=file]").first.set_input_files(str(photo))
    page.wait_for_function(  # searched (the example query is a circle)
        "document.querySelector('#results img').alt.includes('square_03')"
    )
    page.wait_for_function(  # and drawn, at its own size
        "[...document.querySelectorAll('.fit-box .image-frame img')]"
        ".some(i => i.complete && i.naturalWidth === 480)"
    )
    assert "Error" not in page.inner_text("body")
    page.get_by_role("tab", name="Classify").click()  # follows the query: drawn there too
    page.wait_for_function("document.body.innerText.includes('(3 classes).')")
    assert "square" in page.inner_text("#top5")
    assert drawn_width(page, "#classify-tab .fit-box") == 480
    page.locator("#classify-tab button[aria-label='Remove Image']").click()
    page.locator("#classify-tab input[type=file]").first.set_input_files(str(other))
    page.wait_for_function(  # an upload there is drawn too
        "[...document.querySelectorAll('#classify-tab .fit-box .image-frame img')]"
        ".some(i => i.complete && i.naturalWidth === 360 && !i.src.includes('.heic'))"
    )


def test_a_label_given_in_the_page_is_shown_as_the_text_typed(page: Any, server: Any) -> None:
    """A label is one user's text in every user's page: Markdown and HTML in it are shown, not
    rendered (an <img> fetched any address, a [link](...) was a link)."""
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.local_url)
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    page.locator("#results img").nth(1).click()
    page.wait_for_function("document.querySelector('#picked').innerText.includes('Selected')")
    page.get_by_role("tab", name="Classify").click()
    hostile = "<img src=http://t.example/x.gif> [l](http://t.example) *e* ~~s~~"
    box = page.get_by_label("Label (empty removes it)")
    box.fill(hostile)
    page.get_by_role("button", name="Label it").click()
    try:
        page.wait_for_function("document.querySelector('#label-md').innerText.includes('labelled')")
        said = page.locator("#label-md")
        assert said.locator("strong").first.inner_text() == hostile  # our bold, its text
        assert said.locator("img, a, em, del").count() == 0
        assert not [u for u in requested if "t.example" in u]
    finally:
        box.fill("")
        page.get_by_role("button", name="Label it").click()
        page.wait_for_function(
            "document.querySelector('#label-md').innerText.includes('removed the label')"
        )


def test_a_new_search_leaves_no_tile_framed_as_selected(page: Any, server: Any) -> None:
    """The frame of a clicked tile stayed after Search while the selection was cleared: "+ More"
    then said "Click a result first" beside a tile that looked selected."""
    page.goto(server.local_url)
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    framed = page.locator("#results .thumbnail-item.selected")
    page.locator("#results img").nth(3).click()
    page.wait_for_function("document.querySelector('#picked').innerText.includes('Selected')")
    assert framed.count() == 1
    page.locator("#search-btn").click()
    page.wait_for_function("document.querySelector('#picked').innerText.startsWith('Click')")
    page.wait_for_timeout(300)
    assert framed.count() == 0
