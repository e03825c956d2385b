"""The ``app`` subcommand: ``moco-search app [--collection PATH] [--host ...] ...``.

Flags map one to one onto ``app.server.ServerConfig``; gradio and torch are imported only when
the command runs, so ``moco-search --help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this package's subcommands on the `moco-search` parser."""
    p = sub.add_parser("app", help="open the web UI (default: on the demo collection)",
                       description="Search, classify and manage a collection in the browser.")
    p.add_argument("--collection", type=Path, default=None,
                   help="collection directory (default: the demo, built on first run)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; 0.0.0.0 exposes it, use --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require this login (default: none)")
    p.add_argument("--share", action="store_true",
                   help="also publish a public gradio.live link (default: off)")
    p.add_argument("--device", default="cpu", help="torch device for queries (default: cpu)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="events processed at once; more wait in the queue (default: 4)")
    p.add_argument("--max-file-size", default="10mb",
                   help="largest upload accepted (default: 10mb)")
    p.add_argument("--demo-encoder", type=Path, default=None,
                   help="encoder to build the demo collection with (default: app/demo/encoder)")
    p.add_argument("--allow-index", type=Path, nargs="+", default=[], metavar="DIR",
                   help="let the UI's Collection tab add these folders and those below them "
                        "(default: none; the collection's own folders can always be refreshed)")
    p.add_argument("--ready-and-exit", action="store_true",
                   help="start, answer one search through the API, print the URL and exit "
                        "(for tests and scripts; default: off)")
    p.set_defaults(run=run_app)


def run_app(args: argparse.Namespace) -> int:
    from app.server import ServerConfig, parse_auth, serve

    parse_auth(args.auth)  # a malformed --auth is a user error before anything loads
    if args.collection is not None and not args.collection.is_dir():
        raise FileNotFoundError(f"Collection not found: {args.collection}")
    for d in args.allow_index:
        if not d.is_dir():
            raise FileNotFoundError(f"--allow-index: not a folder: {d}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    cfg = ServerConfig(collection=args.collection, host=args.host, port=args.port,
                       auth=args.auth, share=args.share, ready_and_exit=args.ready_and_exit,
                       device=args.device, concurrency=args.concurrency,
                       max_file_size=args.max_file_size, encoder=args.demo_encoder,
                       allow_index=tuple(args.allow_index))
    return serve(cfg)
