"""Subcommands of the `indexes` package: index, search, duplicates, export-embeddings.

Each command maps its flags onto one library call's keyword arguments and prints the result;
torch and faiss are imported inside the command so that ``moco-search --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from indexes.duplicates import THRESHOLD
from moco import add_dataclass_flags, config_from_args, flag


def _encoder_arg(value: str) -> Path:
    """An encoder directory, or a published checkpoint's name (downloaded once, checked).

    Its errors travel as ``ArgumentTypeError``: argparse turns any other error of a ``type``
    into "invalid _encoder_arg value", which hid why a download or its check failed."""
    from moco import resolve_encoder

    try:
        return resolve_encoder(value)
    except (ValueError, OSError) as e:
        raise argparse.ArgumentTypeError(str(e)) from e


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


def _stale_probes(collection: Path) -> None:
    """Say which probes a re-embedding made useless, and the command that trains each again."""
    from indexes.manifest import read_manifest
    from indexes.probes import DEFAULT_PROBE, stale_probes

    for name in stale_probes(collection, read_manifest(collection)["encoder"]["content_hash"]):
        named = "" if name == DEFAULT_PROBE else f" --name {name}"
        print(
            f"moco-search index: probe {name!r} was trained on the old encoder's features and is "
            f"refused from now on: run `moco-search probe train --collection {collection}{named}`",
            file=sys.stderr,
        )


def _shown(path: str) -> str:
    """A path for JSON, which escapes control characters itself (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True, kw_only=True)
class IndexArgs:
    """``moco-search index``: one field per flag (the defaults live here once)."""

    images: tuple[Path, ...] = field(default=(), metadata=flag(nargs="*", metavar="IMAGE_DIR"))
    collection: Path
    encoder: Path | None = field(default=None, metadata=flag(type=_encoder_arg))
    labels: Path | None = None
    batch_size: int = 64
    workers: int | None = None
    device: str | None = None
    index_type: str = "auto"
    max_index_memory: str | None = None
    vector_dtype: str | None = field(default=None, metadata=flag(choices=("float32", "float16")))
    allow_empty: bool = field(default=False, metadata=flag(action="store_true"))
    folder_labels: bool = field(default=False, metadata=flag(action="store_true"))
    move_root: tuple[Path, ...] = field(default=(), metadata=flag(nargs=2, metavar=("OLD", "NEW")))
    forget_root: Path | None = field(default=None, metadata=flag(metavar="FOLDER"))
    reembed: bool = field(default=False, metadata=flag(action="store_true"))


@dataclass(frozen=True, kw_only=True)
class SearchArgs:
    """``moco-search search``."""

    query: tuple[str, ...] = field(default=(), metadata=flag(nargs="*"))
    collection: Path
    k: int = field(default=10, metadata=flag(flags=("-k",)))
    id: int | None = None
    negative: tuple[str, ...] = field(default=(), metadata=flag(action="append", metavar="IMAGE"))
    label: str | None = None
    glob: str | None = None
    min_width: int | None = None
    min_height: int | None = None
    after: float | None = field(default=None, metadata=flag(type=_when))
    before: float | None = field(default=None, metadata=flag(type=_when))
    min_score: float | None = None
    device: str = "cpu"
    json: bool = field(default=False, metadata=flag(action="store_true"))


@dataclass(frozen=True, kw_only=True)
class DuplicatesArgs:
    """``moco-search duplicates``."""

    collection: Path
    threshold: float = THRESHOLD
    json: bool = field(default=False, metadata=flag(action="store_true"))


@dataclass(frozen=True, kw_only=True)
class InfoArgs:
    """``moco-search info``."""

    collection: Path
    json: bool = field(default=False, metadata=flag(action="store_true"))


@dataclass(frozen=True, kw_only=True)
class ExportArgs:
    """``moco-search export-embeddings``."""

    collection: Path
    out: Path


HELP = {
    "images": "folders to index (default: the collection's folders)",
    "collection": "collection directory",
    "encoder": "encoder directory, or a published checkpoint's name such as moco_v2_800ep, "
    "fetched once (default: the one the collection was built with)",
    "labels": "CSV with path,label columns, remembered for later runs (default: the CSV given "
    "before, else parent folder names)",
    "folder_labels": "label by parent folder names again, forgetting a --labels CSV given before",
    "move_root": "the collection's folder OLD moved to NEW: its images keep their ids, labels and "
    "vectors, and the run re-scans NEW",
    "forget_root": "remove one of the collection's folders and all its images from it",
    "reembed": "embed the collection's images again with --encoder, another than the one it was "
    "built with, keeping ids and labels; searches use the old one until it is done, and the same "
    "command carries on if interrupted",
    "batch_size": "images per batch",
    "device": "torch device (default: cuda if present)",
    "workers": "decoding processes (default: CPU count - 1, at most 8)",
    "index_type": "'auto' or a FAISS factory string such as HNSW32",
    "max_index_memory": "memory the 'auto' index may take, e.g. 2GB or 500MB; the most "
    "accurate of Flat, IVF-Flat, IVF-SQfp16, IVF-SQ8, IVF-PQ that fits is built (default: the "
    "collection's, else 2GB)",
    "vector_dtype": "how SQLite stores the exact vectors; float16 halves the database, stored "
    "vectors are converted (default: the collection's, float32 for a new one)",
    "allow_empty": "let a folder that holds no image file now remove all its images from the "
    "collection (default: off, refused: a drive that is not mounted looks like that)",
    "query": "query image file(s); several are averaged",
    "k": "number of results",
    "id": "search by a stored image id instead",
    "negative": "image(s) to steer away from; repeat the flag for more",
    "label": "only images with this label (default: any)",
    "glob": "only relative paths matching (default: any)",
    "min_width": "minimum width (default: any)",
    "min_height": "minimum height (default: any)",
    "after": "modified after this date or Unix time (default: any)",
    "before": "modified before this date or Unix time (default: any)",
    "min_score": "score cut-off",
    "threshold": "cosine similarity to count as duplicate (above 1: exact copies only)",
    "out": "output directory",
}
"""The help of each flag, by field name; ``add_dataclass_flags`` appends the defaults."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this package's subcommands on the `moco-search` parser."""
    p = sub.add_parser(
        "index",
        help="index image folders into a collection (incremental)",
        description="Embed the images under IMAGE_DIRs into a collection. "
        "Re-running only processes new, changed, renamed and deleted files.",
    )
    add_dataclass_flags(p, IndexArgs, HELP, positional=("images",))
    p.set_defaults(run=run_index)

    p = sub.add_parser("search", help="search a collection by example images or by id")
    helps = {
        **HELP,
        "device": "torch device",
        "json": "JSON Lines, one hit per line with its rank (default: table)",
    }
    add_dataclass_flags(p, SearchArgs, helps, positional=("query",))
    p.set_defaults(run=run_search)

    p = sub.add_parser("duplicates", help="list groups of near-duplicate images")
    add_dataclass_flags(p, DuplicatesArgs, {**HELP, "json": "JSON output (default: text)"})
    p.set_defaults(run=run_duplicates)

    p = sub.add_parser(
        "info",
        help="what a collection holds: images, folders, encoder, index, probes, last run",
        description="Show a collection's state without changing it: its images, copies and "
        "errors, each folder (and whether it is there), the encoder (and whether it is there), "
        "the index, the last index run, its probes and an unfinished --reembed.",
    )
    add_dataclass_flags(p, InfoArgs, {**HELP, "json": "one JSON object (default: text)"})
    p.set_defaults(run=run_info)

    p = sub.add_parser("export-embeddings", help="write embeddings.npy, ids.npy, metadata.csv")
    add_dataclass_flags(p, ExportArgs, HELP)
    p.set_defaults(run=run_export)


def run_index(ns: argparse.Namespace) -> int:
    args = config_from_args(IndexArgs, ns)
    kwargs = dict(
        labels_csv=args.labels,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        index_type=args.index_type,
        allow_empty=args.allow_empty,
        folder_labels=args.folder_labels,
        move_root=tuple(args.move_root) or None,
        forget_root=args.forget_root,
    )
    one_process = dict(
        max_index_memory=args.max_index_memory, vector_dtype=args.vector_dtype, reembed=args.reembed
    )
    # torchrun's env, as moco.world_size reads it before a process group exists; not that
    # function itself, whose module imports torch: a run with nothing to embed needs none
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from indexes.distributed import index_distributed

        if args.max_index_memory is not None or args.vector_dtype is not None or args.reembed:
            raise ValueError(
                "--max-index-memory, --vector-dtype and --reembed are not supported under "
                "torchrun; run 'moco-search index --collection C' with them once in one process"
            )
        report = index_distributed(list(args.images), args.collection, args.encoder, **kwargs)
    else:
        from indexes.build import index_images

        report = index_images(
            list(args.images), args.collection, args.encoder, **kwargs, **one_process
        )
    if report is not None:
        print(report.summary())
        if report.reembedded:
            _stale_probes(args.collection)
        if report.total == 0:  # a wrong folder, most likely: not "next: search"
            print(f"moco-search index: {nothing_indexed(report, args.images)}", file=sys.stderr)
            return 0
        print(
            f"next: moco-search search --collection {args.collection} QUERY.jpg, or "
            f"moco-search app --collection {args.collection} for the web UI"
        )
    return 0


def nothing_indexed(report: Any, folders: list[Path]) -> str:
    """Why a collection holds no image after a run: no image files, or none readable."""
    if report.errors:
        failed = sum(report.errors.values())
        return (
            f"none of the {failed} image files could be read (the reasons above): nothing to "
            "search yet"
        )
    from moco import IMAGE_EXTENSIONS

    kinds = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    named = [str(f) for f in folders] or ["the collection's folders"]
    verb = "holds" if len(folders) == 1 else "hold"
    return (
        f"{', '.join(named)} {verb} no image files ({kinds}; subfolders are searched too): "
        "nothing to search yet"
    )


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
    from indexes.store import printable

    print(f"{'rank':>4}  {'score':>7}  {'id':>7}  {'label':<12}  path")
    for rank, h in enumerate(hits, 1):
        label = printable(h.label or "-")
        print(f"{rank:>4}  {h.score:7.4f}  {h.id:>7}  {label:<12.12}  {printable(h.path)}")


def check_image_file(path: str | Path, what: str = "Image") -> None:
    """A missing file, a folder given for a file and a web address are told apart."""
    if "://" in str(path) and not Path(path).exists():
        raise FileNotFoundError(
            f"{what} {path} is a web address: moco-search reads image files on this machine; "
            f"download it first (curl -O {path})"
        )
    if Path(path).is_dir():
        raise IsADirectoryError(
            f"{what} {path} is a folder: give image files (to add a "
            "folder to a collection, use moco-search index)"
        )
    if Path(path).exists() and not Path(path).is_file():  # a FIFO, a device: "not found" lied
        raise ValueError(f"{what} {path} is not a regular file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def run_search(ns: argparse.Namespace) -> int:
    from indexes.collection import Collection
    from indexes.filters import Filters
    from indexes.manifest import read_manifest

    args = config_from_args(SearchArgs, ns)
    if args.id is None and not args.query:
        raise ValueError("give a query image or --id")
    if args.id is not None and (args.query or args.negative):  # the images were ignored
        raise ValueError("give query images or --id, not both (--negative goes with images)")
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
                negatives=list(args.negative),
                filters=f,
                min_score=args.min_score,
            )
        entry = c.manifest.get("index", {})
        if not hits:
            print(f"no results: {why_none(c, args)}", file=sys.stderr)
    if not args.json and entry.get("recall_at_10") is not None:
        print(
            f"index {entry.get('factory')}: recall@10 {entry['recall_at_10']:.3f} against exact "
            "search, measured when it was built",
            file=sys.stderr,
        )
    _print_hits(hits, args.json)
    return 0


def why_none(c: Any, args: SearchArgs) -> str:
    """Why a search found nothing, when its filters say: a label no image has (or one given
    only in the web UI, which --label does not match), a score no cosine similarity reaches;
    else that the filters leave no image."""
    from indexes.store import printable

    labels = set(c.label_counts())
    if args.label is not None and args.label not in labels:
        if args.label in set(c.user_labels().values()):
            return (
                f"{args.label!r} is a label given in the web UI, for probes and kNN; --label "
                "matches the labels images were indexed with (their folders, or index --labels)"
            )
        known = (
            ", ".join(printable(x) for x in sorted(labels)[:10])
            + (", ..." if len(labels) > 10 else "")
            or "none"
        )
        return f"no image is labelled {args.label!r} (labels: {known})"
    if args.min_score is not None and args.min_score > 1:
        return f"--min-score {args.min_score}: scores are cosine similarities, at most 1"
    return "no indexed image passes the filters" if len(c) else "the collection is empty"


def run_duplicates(ns: argparse.Namespace) -> int:
    from indexes.collection import Collection
    from indexes.store import printable

    args = config_from_args(DuplicatesArgs, ns)
    with Collection.open(args.collection) as c:
        groups = c.duplicates(threshold=args.threshold)
    if args.json:
        print(json.dumps([[_hit_dict(h) for h in g] for g in groups], indent=1))
        return 0
    for n, g in enumerate(groups, 1):
        least = min(h.score for h in g)
        print(f"group {n} ({len(g)} images, each at least {least:.4f} like the first)")
        for h in g:
            print(f"  {h.score:7.4f}  {h.id:>7}  {printable(h.path)}")
    print(f"{len(groups)} groups of near-duplicates at threshold {args.threshold}", file=sys.stderr)
    return 0


def run_info(ns: argparse.Namespace) -> int:
    from indexes.status import collection_status

    args = config_from_args(InfoArgs, ns)
    status = collection_status(args.collection)
    print(json.dumps(status.as_dict()) if args.json else status.text())
    return 0


def run_export(ns: argparse.Namespace) -> int:
    from indexes.export import export_embeddings

    args = config_from_args(ExportArgs, ns)
    r = export_embeddings(args.collection, args.out)
    print(f"{r.count} embeddings -> {r.embeddings}, {r.ids}; metadata -> {r.metadata}")
    return 0
