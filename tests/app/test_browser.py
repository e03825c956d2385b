"""The UI in a real browser: Playwright driving Debian's Chromium against a live server.

Skipped with a reason when /usr/bin/chromium is missing, unless MOCO_SEARCH_REQUIRE_BROWSER=1
(set by CI), where a missing browser is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
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


def test_upload_search_click_screenshot(page: Any, server: Any, ctx: Any,
                                        tmp_path: Path) -> None:
    page.goto(server.local_url)
    gallery = page.locator("#results")
    # the example query is searched on load
    page.wait_for_function("document.querySelectorAll('#results img').length >= 12")
    query = str(Path(ctx.roots()[0]) / "square" / "square_03.png")
    page.locator("input[type=file]").first.set_input_files(query)
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].some(i => i.alt && "
        "i.alt.includes('square_03')) || document.body.innerText.includes('square/square_03')")
    first_caption = gallery.locator("img").first.get_attribute("alt") or ""
    assert "square" in (first_caption or page.inner_text("#results"))
    page.locator("#results img").nth(1).click()
    page.wait_for_function("document.body.innerText.includes('Searching from')")
    # the clicked result is now the query picture; searching from it is an ordinary upload
    k = page.locator("input[type=number]").first  # k: 7, so that the new status differs
    k.fill("7")
    k.press("Enter")
    page.locator("#search-btn").click()
    page.wait_for_function("document.querySelector('#search-status').innerText"
                           ".includes('7 results in')")
    assert "Error" not in page.inner_text("body")
    for src in gallery.locator("img").evaluate_all("els => els.map(e => e.src)"):
        assert "/thumbs/" in src  # every tile is a thumbnail, never an original
    shot = tmp_path / "search.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
