"""The ``app`` subcommand: ``moco-search app [--collection PATH] [--host ...] ...``.

Flags are generated from ``app.server.ServerConfig``, one per field, so each default lives there
once; gradio and torch are imported only when the command runs, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import errno
import re
import socket
from pathlib import Path

from moco import add_dataclass_flags, config_from_args

HELP = {
    "collection": "collection directory (default: the demo, built on first run)",
    "host": "address to bind (default: 127.0.0.1; 0.0.0.0 exposes it, use --auth)",
    "port": "port",
    "auth": "require this login",
    "share": "also publish a public gradio.live link",
    "ready_and_exit": "start, answer one search through the API, print the URL and exit "
    "(for tests and scripts)",
    "device": "torch device for queries",
    "concurrency": "events processed at once; more wait in the queue",
    "max_file_size": "largest upload accepted",
    "demo_encoder": "encoder to build the demo collection with (default: app/demo/encoder)",
    "allow_index": "let the UI's Collection tab add these folders and those below them "
    "(default: none; the collection's own folders can always be refreshed)",
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this package's subcommands on the `moco-search` parser."""
    from app.server import ServerConfig

    p = sub.add_parser(
        "app",
        help="open the web UI (default: on the demo collection)",
        description="Search, classify and manage a collection in the browser.",
    )
    add_dataclass_flags(p, ServerConfig, HELP, metavars={"auth": "USER:PASS", "allow_index": "DIR"})
    p.set_defaults(run=run_app)


def check_collection(path: Path) -> None:
    """A clear sentence for the usual mix-ups, before the (slow) collection is opened."""
    if not path.exists():
        raise FileNotFoundError(f"Collection not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"--collection {path} is a file: give a collection directory")
    if not (path / "manifest.json").is_file():
        from indexes.manifest import not_a_collection

        raise FileNotFoundError(not_a_collection(path))


def check_port(host: str, port: int) -> None:
    """Refuse a --host/--port the server cannot listen on now, with the reason, not after the
    collection is loaded and Gradio gives up."""
    if ":" in host:  # Gradio writes http://{host}:{port} and then cannot parse it
        raise ValueError(
            f"--host {host}: the web UI's server takes IPv4 addresses and host names only "
            "(127.0.0.1 for this machine, 0.0.0.0 for all its addresses)"
        )
    with socket.socket(socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a port
        try:  # that a closed server left in TIME_WAIT is free, one being listened on is not
            s.bind((host, port))
        except socket.gaierror as e:
            reason = f"--host {host}: not an address or a known host name ({e.strerror})"
            raise ValueError(reason) from None
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                reason = (
                    f"--host {host} is not an address of this machine (127.0.0.1 for this "
                    "machine only, 0.0.0.0 for all its addresses)"
                )
            elif e.errno == errno.EACCES:
                reason = f"port {port} needs privileges ({e.strerror}): pass a --port from 1024"
            else:
                reason = (
                    f"port {port} on {host} is in use ({e.strerror}): pass another --port, or "
                    "stop the other server"
                )
            raise ValueError(reason) from None


def run_app(args: argparse.Namespace) -> int:
    from app.server import ServerConfig, parse_auth, serve

    parse_auth(args.auth)  # a malformed --auth is a user error before anything loads
    if args.collection is not None:
        check_collection(args.collection)
    for d in args.allow_index:
        if not d.is_dir():
            raise FileNotFoundError(f"--allow-index: not a folder: {d}")
    if not 1 <= args.port <= 65535:  # Gradio does not report the port 0 would pick
        raise ValueError(f"--port must be 1-65535, got {args.port}")
    if args.concurrency < 1:  # 0 served a page whose every event waited forever
        raise ValueError(f"--concurrency must be 1 or more, got {args.concurrency}")
    if not re.fullmatch(r"\d+ *(b|kb|mb|gb|tb)", args.max_file_size.strip(), re.IGNORECASE):
        raise ValueError(
            f"--max-file-size must be a size such as 500kb, 10mb or 1gb, got {args.max_file_size!r}"
        )
    check_port(args.host, args.port)
    return serve(config_from_args(ServerConfig, args))
