"""Subcommands of the `indexes` package: index, search, duplicates, export-embeddings.

Each command maps its flags onto one library call's keyword arguments and prints the result;
torch and faiss are imported inside the command so that ``moco-search --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from indexes.duplicates import THRESHOLD


def _encoder_arg(value: str) -> Path:
    """An encoder directory, or a published checkpoint's name (downloaded once, checked)."""
    from moco import resolve_encoder

    return resolve_encoder(value)


def _when(text: str) -> float:
    """A Unix time, or an ISO date/datetime such as 2024-05-01."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a date or Unix time: {text!r}") from e


def _shown(path: str) -> str:
    """A path printable on any terminal (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this package's subcommands on the `moco-search` parser."""
    p = sub.add_parser(
        "index",
        help="index image folders into a collection (incremental)",
        description="Embed the images under IMAGE_DIRs into a collection. "
        "Re-running only processes new, changed, renamed and deleted files.",
    )
    p.add_argument(
        "images",
        nargs="*",
        type=Path,
        metavar="IMAGE_DIR",
        help="folders to index (default: the collection's folders)",
    )
    p.add_argument("--collection", type=Path, required=True, help="collection directory")
    p.add_argument(
        "--encoder",
        type=_encoder_arg,
        default=None,
        help="encoder directory, or a published checkpoint's name such as "
        "moco_v2_800ep, fetched once (default: the one the collection was built with)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="CSV with path,label columns (default: parent folder names)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (default: CPU count - 1, at most 8)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument(
        "--index-type",
        default="auto",
        help="'auto' or a FAISS factory string such as HNSW32 (default: auto)",
    )
    p.add_argument(
        "--max-index-memory",
        default=None,
        help="memory the 'auto' index may take, e.g. 2GB or 500MB; the most accurate of Flat, "
        "IVF-Flat, IVF-SQ8, IVF-PQ that fits is built (default: the collection's, else 2GB)",
    )
    p.add_argument(
        "--vector-dtype",
        choices=["float32", "float16"],
        default=None,
        help="how SQLite stores the exact vectors; float16 halves the database, stored vectors "
        "are converted (default: the collection's, float32 for a new one)",
    )
    p.set_defaults(run=run_index)

    p = sub.add_parser("search", help="search a collection by example images or by id")
    p.add_argument("query", nargs="*", help="query image file(s); several are averaged")
    p.add_argument("--collection", type=Path, required=True, help="collection directory")
    p.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    p.add_argument(
        "--id", type=int, default=None, help="search by a stored image id instead (default: none)"
    )
    p.add_argument(
        "--negative",
        action="append",
        default=[],
        metavar="IMAGE",
        help="image(s) to steer away from (default: none)",
    )
    p.add_argument("--label", default=None, help="only images with this label (default: any)")
    p.add_argument("--glob", default=None, help="only relative paths matching (default: any)")
    p.add_argument("--min-width", type=int, default=None, help="minimum width (default: any)")
    p.add_argument("--min-height", type=int, default=None, help="minimum height (default: any)")
    p.add_argument("--after", type=_when, default=None, help="modified after (default: any)")
    p.add_argument("--before", type=_when, default=None, help="modified before (default: any)")
    p.add_argument("--min-score", type=float, default=None, help="score cut-off (default: none)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON Lines, one hit per line with its rank (default: table)",
    )
    p.set_defaults(run=run_search)

    p = sub.add_parser("duplicates", help="list groups of near-duplicate images")
    p.add_argument("--collection", type=Path, required=True, help="collection directory")
    p.add_argument(
        "--threshold",
        type=float,
        default=THRESHOLD,
        help=f"cosine similarity to count as duplicate (default: {THRESHOLD})",
    )
    p.add_argument("--json", action="store_true", help="JSON output (default: text)")
    p.set_defaults(run=run_duplicates)

    p = sub.add_parser("export-embeddings", help="write embeddings.npy, ids.npy, metadata.csv")
    p.add_argument("--collection", type=Path, required=True, help="collection directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(run=run_export)


def run_index(args: argparse.Namespace) -> int:
    from indexes.distributed import index_distributed
    from moco import world_size

    kwargs = dict(
        labels_csv=args.labels,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        index_type=args.index_type,
    )
    storage = dict(max_index_memory=args.max_index_memory, vector_dtype=args.vector_dtype)
    if world_size() > 1:
        if any(v is not None for v in storage.values()):
            raise ValueError(
                "--max-index-memory and --vector-dtype are not supported under torchrun; "
                "run 'moco-search index --collection C' with them once in one process"
            )
        report = index_distributed(args.images, args.collection, args.encoder, **kwargs)
    else:
        from indexes.build import index_images

        report = index_images(args.images, args.collection, args.encoder, **kwargs, **storage)
    if report is not None:
        print(report.summary())
        print(
            f"next: moco-search search --collection {args.collection} QUERY.jpg, or "
            f"python launch.py --collection {args.collection} for the web UI"
        )
    return 0


def _hit_dict(h: Any) -> dict[str, Any]:
    return {
        "id": h.id,
        "score": round(h.score, 6),
        "path": _shown(h.path),
        "relpath": h.relpath,
        "label": h.label,
        **h.meta,
    }


def _print_hits(hits: list[Any], as_json: bool) -> None:
    """A table, or JSON Lines (one hit per line) with the same 1-based ``rank`` as the UI's."""
    if as_json:
        for rank, h in enumerate(hits, 1):
            print(json.dumps({"rank": rank, **_hit_dict(h)}))
        return
    print(f"{'rank':>4}  {'score':>7}  {'id':>7}  {'label':<12}  path")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:>4}  {h.score:7.4f}  {h.id:>7}  {h.label or '-':<12.12}  {_shown(h.path)}")


def check_image_file(path: str | Path, what: str = "Image") -> None:
    """A missing file and a folder given for a file are told apart."""
    if Path(path).is_dir():
        raise IsADirectoryError(
            f"{what} {path} is a folder: give image files (to add a "
            "folder to a collection, use moco-search index)"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def run_search(args: argparse.Namespace) -> int:
    from indexes.collection import Collection
    from indexes.filters import Filters
    from indexes.manifest import read_manifest

    if args.id is None and not args.query:
        raise ValueError("give a query image or --id")
    read_manifest(args.collection)  # a wrong collection is the first thing to report
    for q in [*args.query, *args.negative]:
        check_image_file(q, "Query image")
    f = Filters(
        label=args.label,
        path_glob=args.glob,
        min_width=args.min_width,
        min_height=args.min_height,
        modified_after=args.after,
        modified_before=args.before,
    )
    with Collection.open(args.collection, device=args.device) as c:
        if args.id is not None:
            hits = c.search_id(args.id, k=args.k, filters=f)
        else:
            hits = c.search(
                list(args.query),
                k=args.k,
                negatives=args.negative,
                filters=f,
                min_score=args.min_score,
            )
        entry = c.manifest.get("index", {})
    if not args.json and entry.get("recall_at_10") is not None:
        print(
            f"index {entry.get('factory')}: recall@10 {entry['recall_at_10']:.3f} against exact "
            "search, measured when it was built",
            file=sys.stderr,
        )
    _print_hits(hits, args.json)
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    from indexes.collection import Collection

    with Collection.open(args.collection) as c:
        groups = c.duplicates(threshold=args.threshold)
    if args.json:
        print(json.dumps([[_hit_dict(h) for h in g] for g in groups], indent=1))
        return 0
    for n, g in enumerate(groups, 1):
        least = min(h.score for h in g)
        print(f"group {n} ({len(g)} images, each at least {least:.4f} like the first)")
        for h in g:
            print(f"  {h.score:7.4f}  {h.id:>7}  {_shown(h.path)}")
    print(f"{len(groups)} groups of near-duplicates at threshold {args.threshold}", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from indexes.export import export_embeddings

    r = export_embeddings(args.collection, args.out)
    print(f"{r.count} embeddings -> {r.embeddings}, {r.ids}; metadata -> {r.metadata}")
    return 0
