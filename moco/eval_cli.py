"""``moco-search eval``: an encoder (and the baselines it must beat) measured on two folders.

The flags are generated from ``EvalArgs``, one per field, so each default lives there once;
torch is imported only when the command runs, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from moco.config import KNN_K, KNN_T
from moco.flags import add_dataclass_flags, config_from_args, flag

log = logging.getLogger(__name__)


def _eval(ns: argparse.Namespace) -> int:
    from moco.evaluate import (
        EvalConfig,
        check_spec,
        evaluate_many,
        format_table,
        shared_images,
        write_json,
    )
    from moco.files import output_folder
    from moco.probe import ProbeConfig

    args = config_from_args(EvalArgs, ns)
    probe = ProbeConfig.preset("paper" if args.protocol == "paper" else "fast")
    if args.probe_epochs:
        probe = dataclasses.replace(probe, epochs=args.probe_epochs)
    cfg = EvalConfig(
        protocol=args.protocol,
        k=args.k,
        T=args.t,
        probe=probe,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        monitor_size=args.monitor_size,
        image_size=args.image_size,
        seed=args.seed,
    )
    if args.json_out:  # said now, not after the evaluation
        if Path(args.json_out).is_dir():
            raise IsADirectoryError(f"--json-out {args.json_out} is a folder: give a file name")
        output_folder(Path(args.json_out).parent, "--json-out")
    shared, n_val = shared_images(args.train, args.val)
    if shared == n_val:
        raise ValueError(
            f"every image of --val {args.val} is also in --train {args.train}: each would be "
            "its own nearest neighbour, so every score would be near 100% and mean nothing; "
            "give --val a folder of held-out images"
        )
    if shared:
        log.warning(
            "%d of the %d --val images are --train images too: kNN and retrieval count each "
            "of those as found",
            shared,
            n_val,
        )
    baselines = default_baselines(args.encoder, args.baselines)
    for b in baselines:  # said now, not after the encoder's row
        try:
            check_spec(b)
        except ValueError as e:
            raise ValueError(f"--baselines: {e}") from None
    rows = evaluate_many([args.encoder, *baselines], args.train, args.val, cfg)
    print(format_table(rows))
    if args.json_out:
        print(f"wrote {write_json(rows, args.json_out)}")
    return 0


def default_baselines(encoder: str, given: str) -> list[str]:
    """The rows printed beside ``encoder``: ``given`` (comma-separated), "none", or by default
    ("auto") raw pixels and the encoder's own network with random weights, at its input size
    and pooling (``moco.evaluate.random_like``)."""
    if given == "none":
        return []
    if given != "auto":
        return [b for b in given.split(",") if b]
    if encoder == "pixels" or encoder.startswith("random:"):
        return []
    from moco.encoder_config import read_encoder_config

    try:
        enc = read_encoder_config(encoder)
    except (OSError, ValueError):
        return ["pixels"]  # eval reports the bad encoder path itself
    base = ["pixels", f"random:{encoder}"]
    if not enc.fit:
        return base
    # an encoder centred (whitened) on its images is measured beside baselines given the same
    # map: centring alone lifts raw pixels' kNN by 5-9 points (docs/pretraining.md)
    return [b + plus for b in base for plus in ("", f"+{enc.fit['kind']}")]


@dataclass(frozen=True, kw_only=True)
class EvalArgs:
    """``moco-search eval``: one field per flag (the defaults live here once)."""

    encoder: str
    train: str
    val: str
    baselines: str = "auto"
    protocol: str = field(default="cached", metadata=flag(choices=("cached", "paper")))
    probe_epochs: int = 0
    k: int = KNN_K
    t: float = KNN_T
    batch_size: int = 64
    device: str = "cpu"
    workers: int = 0
    monitor_size: int = 256
    image_size: int | None = None
    seed: int = 0
    json_out: str | None = None


EVAL_HELP = {
    "encoder": "encoder directory, or a baseline: pixels, random:ARCH, random:ARCH:small, "
    "random:ENCODER_DIR",
    "train": "labelled ImageFolder tree to train on",
    "val": "labelled ImageFolder tree to measure on",
    "baselines": "rows to measure beside the encoder, comma-separated (pixels, random:ARCH, "
    "random:ARCH:small, random:ENCODER_DIR; +center or +whiten gives one the map export fits, "
    "e.g. pixels+center), or none (default: auto, raw pixels and the encoder's own network "
    "with random weights at its input size and pooling, and both with the encoder's map if it "
    "has one: the bar training must clear)",
    "protocol": "linear probe on cached features, or MoCo's protocol (SGD lr=30, 100 "
    "epochs, RandomResizedCrop+flip on the frozen backbone)",
    "probe_epochs": "override the preset's epochs / L-BFGS iterations (0: the preset's)",
    "k": "kNN neighbours",
    "t": "kNN temperature",
    "batch_size": "images per forward",
    "device": "cpu, cuda, cuda:1 ...",
    "workers": "data-loading processes",
    "monitor_size": "held-out images for the augmented-view monitor",
    "image_size": "input size of the baselines (default: pixels 16, random:ARCH 32 "
    "small/224, random:ENCODER_DIR the encoder's)",
    "seed": "seed of probe, baselines and views",
    "json_out": "write the rows as JSON here",
}


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``: kNN, linear probe, retrieval and a label-free monitor on folders."""
    p = sub.add_parser(
        "eval",
        help="measure an encoder: kNN, linear probe, retrieval, label-free monitor",
        description="Evaluate an encoder on two ImageFolder trees (one subfolder per class): "
        "weighted kNN top-1, linear-probe top-1/top-5, retrieval mAP@10 and recall@1/5/10 "
        "(val queries against train), and recall@1 of the other augmented view (no labels).",
    )
    add_dataclass_flags(p, EvalArgs, EVAL_HELP)
    p.set_defaults(run=_eval)
