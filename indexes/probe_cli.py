"""The ``probe`` subcommand: train | predict | classify-all on a collection's stored vectors.

Flags map onto the keyword arguments of one function of ``indexes.classify`` each; torch and
faiss are imported inside the commands so that ``moco-search --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from indexes.cli import check_image_file
from moco import KNN_K, KNN_T


def run_train(args: argparse.Namespace) -> int:
    from indexes.classify import train_collection_probe
    from indexes.collection import Collection
    from moco import ProbeConfig

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


def run_predict(args: argparse.Namespace) -> int:
    from indexes.classify import predict_images
    from indexes.collection import Collection
    from moco import ImageError, load_image

    if not args.images:
        raise ValueError("give at least one image file to classify")
    good: list[str] = []
    failed: list[Exception] = []
    for p in args.images:  # one bad file is reported; the others are still classified
        try:
            check_image_file(p)
            load_image(p)
            good.append(str(p))
        except (OSError, ImageError) as e:
            failed.append(e)
            if len(args.images) > 1:
                reason = e.reason if isinstance(e, ImageError) else str(e)
                print(f"moco-search probe predict: {p}: skipped: {reason}", file=sys.stderr)
    if not good:
        raise failed[0] if len(failed) == 1 else ValueError("none of the files could be used")
    with Collection.open(args.collection, device=args.device) as col:
        preds = predict_images(
            col,
            good,
            name=args.name,
            knn=args.knn,
            k=args.top,
            knn_k=args.knn_k,
            T=args.knn_t,
        )
    for pred in preds:
        if args.json:
            print(json.dumps(pred.to_dict()))
        else:
            tops = "  ".join(
                f"{lab} {p:.0%}" for lab, p in zip(pred.labels, pred.probs, strict=True)
            )
            print(f"{pred.source}: {tops}")
    return 1 if failed else 0


def run_classify_all(args: argparse.Namespace) -> int:
    from indexes.classify import classify_all
    from indexes.collection import Collection

    with Collection.open(args.collection) as col:
        report = classify_all(col, name=args.name, knn=args.knn, knn_k=args.knn_k, T=args.knn_t)
    print(report.summary())
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", type=Path, required=True, help="collection directory")
    p.add_argument(
        "--name",
        default="default",
        help="probe name, a folder under COLLECTION/probes (default: default)",
    )


def _knn_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--knn",
        action="store_true",
        help="weighted kNN over the labelled images instead of the probe; needs no "
        "training (default: off)",
    )
    p.add_argument("--knn-k", type=int, default=KNN_K, help=f"kNN neighbours (default: {KNN_K})")
    p.add_argument("--knn-t", type=float, default=KNN_T, help=f"kNN temperature (default: {KNN_T})")


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
    _common(p)
    p.add_argument(
        "--preset",
        choices=("fast", "paper"),
        default="fast",
        help="fast: normalised features + L-BFGS; paper: SGD lr=30, 100 epochs (default: fast)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="override the preset's epochs / iterations (default: 0 = preset)",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=5,
        help="cross-validation folds for up to 2000 labels; 0 = one split (default: 5)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="held-out share for a single split (default: 0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print metrics as JSON (default: off)")
    p.set_defaults(run=run_train)

    p = actions.add_parser("predict", help="top-5 labels of image files, with probabilities")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files")
    _common(p)
    _knn_flags(p)
    p.add_argument("--top", type=int, default=5, help="labels shown per image (default: 5)")
    p.add_argument("--device", default="cpu", help="torch device for embedding (default: cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object per image (default: off)")
    p.set_defaults(run=run_predict)

    p = actions.add_parser(
        "classify-all", help="predict every unlabelled image; store label + confidence"
    )
    _common(p)
    _knn_flags(p)
    p.set_defaults(run=run_classify_all)
