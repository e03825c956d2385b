"""Serving the UI: open the collection, build the demo, and launch it with safe settings.

Safe by default: bound to 127.0.0.1; ``--host 0.0.0.0`` without ``--auth`` prints a warning; no
share link unless asked; files are served only from the collection's thumbnail folder
(``allowed_paths``; never the image folders themselves) and the collection's own files are
``blocked_paths``; the UI indexes only folders given to ``--allow-index``; uploads are capped by
``max_file_size`` and decoded by ``moco.load_image``; a bounded number of events run at once
(``default_concurrency_limit``). docs/ui.md "Security" lists what is served and refused.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerConfig:
    """How ``moco-search app`` serves (one field per command-line flag)."""

    collection: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None
    share: bool = False
    ready_and_exit: bool = False
    device: str = "cpu"
    concurrency: int = 4
    max_file_size: str = "10mb"
    demo_encoder: Path | None = None
    """Demo only: the encoder directory to build the demo collection with."""
    allow_index: tuple[Path, ...] = ()
    """Folders the UI may add to the collection (and those below them); none by default."""


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """``user:pass`` -> (user, pass); the password may contain ':'."""
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth must look like user:password, got {auth.split(':')[0]!r}:...")
    return user, password


def exposure_warning(host: str, auth: str | None, share: bool) -> str | None:
    """The warning to print when the UI is reachable by others without a password."""
    if auth:
        return None
    if share:
        return (
            "WARNING: --share publishes this UI on a public gradio.live link without "
            "--auth: anyone with the link can search your images."
        )
    if host not in LOOPBACK:
        return (
            f"WARNING: serving on {host} without --auth: anyone who can reach this machine "
            "can browse the indexed images. Add --auth user:password."
        )
    return None


def open_context(cfg: ServerConfig) -> Any:
    """The ``AppContext`` of ``--collection``, or of the demo collection (built on first use)."""
    from app.context import AppContext

    if cfg.collection is None:
        from app.demo import DEMO_ENCODER, demo_example, ensure_demo_collection

        path = ensure_demo_collection(encoder=cfg.demo_encoder or DEMO_ENCODER)
        ctx = AppContext.open(
            path, device=cfg.device, example=demo_example(), allow_index=cfg.allow_index
        )
        ctx.title = "demo"
        return ctx
    ctx = AppContext.open(cfg.collection, device=cfg.device, allow_index=cfg.allow_index)
    if missing := ctx.collection.encoder_missing():  # browsing still works: serve, and say so
        print(f"WARNING: {missing}. Until then searching by an upload fails.", file=sys.stderr)
    first = ctx.collection.query_records(
        "images.id = (SELECT min(id) FROM images WHERE status = 'ok')"
    )
    ctx.example = ctx.shown_file(first[0].path, first[0].meta()) if first else None
    return ctx


def launch(ctx: Any, cfg: ServerConfig) -> Any:
    """Build and start the demo without blocking; return the running ``gr.Blocks``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no phoning home
    # Gradio asks matplotlib for its backend around every event; unset, matplotlib resolves it by
    # importing pyplot and probing GUI toolkits: 1.2 s of the first search. A server draws no
    # windows, so name the headless backend before matplotlib is imported (a user's choice stands).
    os.environ.setdefault("MPLBACKEND", "agg")
    from app.ui import CSS, build_demo

    warning = exposure_warning(cfg.host, cfg.auth, cfg.share)
    if warning:
        print(warning, file=sys.stderr)
    import gradio as gr

    # Thumbnails are served from where they lie instead of being hashed and copied into
    # Gradio's cache on every search (the one folder ``allowed_paths`` serves).
    gr.set_static_paths(ctx.served_dirs)
    demo = build_demo(ctx)
    demo.queue(default_concurrency_limit=cfg.concurrency, max_size=256)
    demo.launch(
        server_name=cfg.host,
        server_port=cfg.port,
        auth=parse_auth(cfg.auth),
        share=cfg.share,
        allowed_paths=ctx.served_dirs,
        blocked_paths=ctx.blocked_paths(),
        max_file_size=cfg.max_file_size,
        prevent_thread_lock=True,
        show_error=False,
        quiet=True,
        ssr_mode=False,
        inbrowser=False,
        enable_monitoring=False,
        css=CSS,
    )
    # The page is served without torch; the encoder loads while the user picks a first image.
    threading.Thread(target=ctx.collection.warm, name="load-encoder", daemon=True).start()
    return demo


def self_check(url: str, ctx: Any, auth: str | None) -> int:
    """Search the example query through the API, as a user's browser would; return #results."""
    from gradio_client import Client, handle_file

    if not ctx.example:
        return 0
    client = Client(url, auth=parse_auth(auth), verbose=False, download_files=False)
    _, rows, _ = client.predict(handle_file(ctx.example), 5, "(any)", "", -1, api_name="/search")
    return len(rows)


def serve(cfg: ServerConfig) -> int:
    """Open, launch and serve until interrupted (or, with ``ready_and_exit``, check and stop)."""
    ctx = open_context(cfg)
    demo = launch(ctx, cfg)
    url = demo.local_url
    try:
        if cfg.ready_and_exit:
            n = self_check(url, ctx, cfg.auth)
            print(
                f"moco-search app: ready at {url} ({len(ctx.collection)} images; the example "
                f"query returned {n} results)"
            )
            return 0
        print(f"moco-search app: serving {ctx.path} at {url} (Ctrl+C to stop)")
        demo.block_thread()
        return 0
    finally:
        demo.close()
        ctx.collection.close()
