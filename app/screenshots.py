"""Screenshots of each tab for the docs: a live server driven by headless Chromium (Playwright).

    python -m app.screenshots [--collection PATH] [--out docs/img]

Without ``--collection`` it serves the demo collection (built on first use). Debian's Chromium
at /usr/bin/chromium is used; Playwright never downloads a browser.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def take(url: str, out: Path, width: int = 1400, height: int = 1000) -> list[Path]:
    """Visit each tab of the UI at ``url``, trigger its main view, save one PNG per tab."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#results img').length >= 6")
        page.wait_for_timeout(800)
        shots.append(out / "search.png")
        page.screenshot(path=str(shots[-1]))
        page.get_by_role("tab", name="Classify").click()  # classifies the current query
        page.wait_for_function("document.body.innerText.includes('classes).')")
        page.wait_for_timeout(800)
        shots.append(out / "classify.png")
        page.screenshot(path=str(shots[-1]))
        page.get_by_role("tab", name="Collection").click()
        page.get_by_role("button", name="Draw the embedding map (PCA)").click()
        page.wait_for_function("document.querySelector('#map svg circle') !== null")
        page.wait_for_timeout(1000)
        shots.append(out / "collection.png")
        page.screenshot(path=str(shots[-1]), full_page=True)
        page.get_by_role("tab", name="Encoder").click()
        page.wait_for_timeout(1000)
        shots.append(out / "encoder.png")
        page.screenshot(path=str(shots[-1]))
        browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--collection", type=Path, default=None, help="default: the demo")
    ap.add_argument("--demo-encoder", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args(argv)
    from app.server import ServerConfig, launch, open_context

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(collection=args.collection, port=port, demo_encoder=args.demo_encoder)
    ctx = open_context(cfg)
    demo = launch(ctx, cfg)
    try:
        for p in take(demo.local_url, args.out):
            print(p)
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
