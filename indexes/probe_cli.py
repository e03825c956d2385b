"""The ``probe`` subcommand: train | predict | classify-all on a collection's stored vectors.

Flags map onto the keyword arguments of one function of ``indexes.classify`` each; torch and
faiss are imported inside the commands so that ``moco-search --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from indexes.cli import check_image_file
from moco import KNN_K, KNN_T, add_dataclass_flags, config_from_args, flag


def run_train(ns: argparse.Namespace) -> int:
    from indexes.classify import train_collection_probe
    from indexes.collection import Collection
    from moco import ProbeConfig

    args = config_from_args(TrainArgs, ns)
    cfg = ProbeConfig.preset(args.preset)
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    with Collection.open(args.collection) as col:
        report = train_collection_probe(
            col,
            name=args.name,
            cfg=cfg,
            val_fraction=args.val_fraction,
            folds=args.folds,
            seed=args.seed,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "name": report.name,
                    "path": str(report.path),
                    "method": report.method,
                    "n_labeled": report.n_labeled,
                    **report.metrics.to_dict(),
                },
                indent=1,
            )
        )
    else:
        print(report.summary())
        if report.confusion_png:
            print(f"confusion matrix: {report.confusion_png}")
    return 0


PREDICT_CHUNK = 256
"""Images classified at a time: a folder of any size prints as it goes, in bounded memory."""


def image_files(paths: Sequence[str], skip: Callable[[str, str], None]) -> list[str]:
    """The files ``paths`` name: a file as itself, a folder as the images under it (recursive,
    sorted; hidden folders and moco-search's own passed over, as ``index`` does). A folder with
    no image in it is ``skip``ped with the reason, or refused if it is all that was given."""
    from moco import IMAGE_EXTENSIONS, list_images

    files: list[str] = []
    for p in paths:
        if not Path(p).is_dir():
            files.append(p)
            continue
        found = [str(f) for f in list_images(p)]
        if not found:
            reason = f"no image files in this folder ({' '.join(sorted(IMAGE_EXTENSIONS))})"
            if len(paths) == 1:
                raise FileNotFoundError(f"{p}: {reason}")
            skip(p, reason)
        files += found
    return files


def run_predict(ns: argparse.Namespace) -> int:
    from indexes.classify import predict_images
    from indexes.collection import Collection
    from indexes.embed import draft_size
    from indexes.store import printable
    from moco import ImageError, load_image

    args = config_from_args(PredictArgs, ns)
    if args.top < 1:  # -1 sliced off the last label, 0 printed none
        raise ValueError(f"--top must be at least 1, got {args.top}")
    if not args.images:
        raise ValueError("give at least one image file or folder to classify")
    skipped: list[str] = []

    def skip(path: str, reason: str) -> None:
        skipped.append(path)
        print(f"moco-search probe predict: {path}: skipped: {reason}", file=sys.stderr)

    alone = len(args.images) == 1 and not Path(args.images[0]).is_dir()
    files = image_files(args.images, skip)
    if alone:  # before the collection and torch load: a typo or a folder answers at once
        check_image_file(files[0])
    predicted = 0
    with Collection.open(args.collection, device=args.device) as col:
        draft = draft_size(col.encoder_config)

        def readable(path: str) -> bool:
            """Decoded as embedding decodes it (a JPEG at reduced scale: a 108 MP photo is
            readable, not a "decompression bomb")."""
            try:
                check_image_file(path)
                load_image(path, draft_size=draft)
            except (OSError, ImageError) as e:
                if alone and isinstance(e, ImageError) and path not in str(e):  # named, as
                    named = f"{path} ({e.detail})" if e.detail else path  # search names it
                    raise ImageError(e.reason, named) from e
                if alone:
                    raise  # the one image given: its error is the command's
                skip(path, e.reason if isinstance(e, ImageError) else str(e))
                return False
            return True

        predict = partial(
            predict_images,
            col,
            name=args.name,
            knn=args.knn,
            k=args.top,
            knn_k=args.knn_k,
            T=args.knn_t,
        )
        for start in range(0, len(files), PREDICT_CHUNK):
            chunk = files[start : start + PREDICT_CHUNK]
            try:  # each image decoded once; a chunk holding one that cannot be read is
                preds = predict(chunk)
            except (OSError, ImageError):  # looked over image by image, the others classified
                chunk = [p for p in chunk if readable(p)]
                preds = predict(chunk) if chunk else []
            for pred in preds:
                if args.json:
                    print(json.dumps(pred.to_dict()))
                else:
                    tops = "  ".join(
                        f"{printable(lab)} {p:.0%}"
                        for lab, p in zip(pred.labels, pred.probs, strict=True)
                    )
                    print(f"{printable(pred.source)}: {tops}")
            sys.stdout.flush()  # a folder's first results show while the rest are classified
            predicted += len(preds)
    if not predicted:
        raise ValueError("none of the images given could be classified")
    return 1 if skipped else 0


def run_classify_all(ns: argparse.Namespace) -> int:
    from indexes.classify import classify_all, read_predictions
    from indexes.collection import Collection

    args = config_from_args(ClassifyAllArgs, ns)
    with Collection.open(args.collection) as col:
        report = classify_all(col, name=args.name, knn=args.knn, knn_k=args.knn_k, T=args.knn_t)
        if args.json:  # the stored predictions, one JSON object per image
            found = read_predictions(col)
            for rec in col.records(sorted(found)):
                print(json.dumps({"id": rec.id, "path": rec.path, **found[rec.id]}))
            print(report.summary(), file=sys.stderr)
            return 0
    print(report.summary())
    print(
        f"  kept in {args.collection}/meta.db, table predictions (--json prints them; "
        "indexes.classify.read_predictions reads them)"
    )
    return 0


@dataclass(frozen=True, kw_only=True)
class ProbeArgs:
    """The flags every ``probe`` action has (one field per flag; the defaults live here)."""

    collection: Path
    name: str = "default"


@dataclass(frozen=True, kw_only=True)
class KnnArgs(ProbeArgs):
    knn: bool = field(default=False, metadata=flag(action="store_true"))
    knn_k: int = KNN_K
    knn_t: float = KNN_T


@dataclass(frozen=True, kw_only=True)
class TrainArgs(ProbeArgs):
    """``probe train``."""

    preset: str = field(default="fast", metadata=flag(choices=("fast", "paper")))
    epochs: int = 0
    folds: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    json: bool = field(default=False, metadata=flag(action="store_true"))


@dataclass(frozen=True, kw_only=True)
class PredictArgs(KnnArgs):
    """``probe predict``."""

    images: tuple[str, ...] = field(default=(), metadata=flag(nargs="*", metavar="IMAGE"))
    top: int = 5
    device: str = "cpu"
    json: bool = field(default=False, metadata=flag(action="store_true"))


@dataclass(frozen=True, kw_only=True)
class ClassifyAllArgs(KnnArgs):
    """``probe classify-all``."""

    json: bool = field(default=False, metadata=flag(action="store_true"))


HELP = {
    "collection": "collection directory",
    "name": "probe name, a folder under COLLECTION/probes",
    "knn": "weighted kNN over the labelled images instead of the probe; needs no training",
    "knn_k": "kNN neighbours",
    "knn_t": "kNN temperature",
    "preset": "fast: normalised features + L-BFGS; paper: SGD lr=30, 100 epochs",
    "epochs": "override the preset's epochs / iterations (0: the preset's)",
    "folds": "cross-validation folds for up to 2000 labels; 0 = one split",
    "val_fraction": "held-out share for a single split",
    "seed": "split and training seed",
    "images": "image files, or folders of them (recursive)",
    "top": "labels shown per image",
    "device": "torch device for embedding",
}
"""The help of each flag, by field name; ``add_dataclass_flags`` appends the defaults."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``probe`` with its actions train, predict and classify-all."""
    probe = sub.add_parser(
        "probe",
        help="classify a collection: train a linear probe on its labels, predict",
        description="Linear classifier (or kNN) on the stored vectors of a collection; labels "
        "come from folder names or the labels CSV given to `index`.",
    )
    actions = probe.add_subparsers(dest="probe_action", metavar="ACTION", required=True)

    p = actions.add_parser("train", help="train, measure and save a probe on the labelled images")
    add_dataclass_flags(p, TrainArgs, {**HELP, "json": "print metrics as JSON"})
    p.set_defaults(run=run_train)

    p = actions.add_parser("predict", help="top-5 labels of image files, with probabilities")
    helps = {**HELP, "json": "one JSON object per image"}
    add_dataclass_flags(p, PredictArgs, helps, positional=("images",))
    p.set_defaults(run=run_predict)

    p = actions.add_parser(
        "classify-all", help="predict every unlabelled image; store label + confidence"
    )
    add_dataclass_flags(p, ClassifyAllArgs, {**HELP, "json": "one JSON object per image"})
    p.set_defaults(run=run_classify_all)
