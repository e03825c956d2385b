"""Subcommands of the `moco` package: pretrain, export (and eval, in its own section below).

Flags are generated from the config dataclass, one per field, so the CLI can never drift from
the library: ``--moco-k`` is ``TrainConfig.moco_k``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moco.config import ADAPT_HELP
from moco.flags import add_dataclass_flags, config_from_args

RECIPE = "(default: chosen for the folder and the device, docs/pretraining.md)"
"""The help's default for a field ``moco.recipe.auto_config`` fills in when left unset."""
HELP = {
    "data": "folder of images to train on (searched recursively; no labels needed)",
    "version": "MoCo recipe: v2 (MLP head, T=0.2, blur, cosine lr) or v1",
    "mechanism": "where the keys come from (docs/mechanisms.md): moco (momentum encoder and "
    "queue), end-to-end (the query encoder, the batch's other images as negatives: K = batch - "
    "1) or memory-bank (one stored feature per image, K sampled negatives; InstDisc)",
    "arch": "backbone: resnet18, resnet34, resnet50, resnet101, resnet152, wide_resnet50_2",
    "small_stem": "3x3 stem without max-pool for small images "
    "(default: on at <= 96 px on a GPU; off on a CPU, where it costs 16x)",
    "image_size": "training crop size in pixels (default: 32 on a CPU, where 15 minutes at 64 px "
    "did not learn, docs/pretraining.md; 224 on a GPU)",
    "embed_size": "size the exported encoder embeds at (default: --image-size; 1.5x it finds the "
    "same object drawn in another style more often and classifies worse, docs/pretraining.md)",
    "epochs": "passes over the images (ignored with --minutes)",
    "minutes": "train for this long instead: the pace of the first steps sets the epochs and "
    "the schedule, and the run stops itself on time (0: use --epochs)",
    "batch_size": "images per step, over all processes " + RECIPE,
    "lr": "learning rate " + RECIPE,
    "weight_decay": "SGD weight decay (default: 5e-4 on images of at most 96 px, the official "
    "CIFAR demo's; else the paper's 1e-4)",
    "warmup_epochs": "linear warm-up before the cosine (default: 0, or a short warm-up with "
    "--minutes)",
    "moco_dim": "embedding width compared by the loss",
    "moco_k": "negatives K: the queue's size, or the memory bank's sample; keep it below the "
    "number of images (default: a tenth of the images; the paper's ImageNet value is 65536)",
    "moco_m": "key-encoder momentum m (default: 0.99, lowered for short runs by --m-schedule "
    "fit; the paper's is 0.999 constant)",
    "m_schedule": "momentum schedule: fit (constant, at most 1 - 10/steps), cosine (m rises to "
    "1, as in BYOL and MoCo v3) or constant",
    "moco_t": "softmax temperature T (default: 0.1 for v2 on images of at most 96 px, the "
    "official CIFAR demo's; else 0.07 for v1, 0.2 for v2)",
    "bank_t": "memory-bank: momentum t of an entry's update v <- t v + (1 - t) q",
    "mlp": "MLP projection head (default: on for v2, off for v1)",
    "head_bn": "BatchNorm in the projection head",
    "symmetric": "symmetric loss (both views as queries)",
    "exclude_nearest": "leave the N queued keys nearest each query's key out of its negatives: "
    "probably the same object seen otherwise (false-negative elimination; 0: off)",
    "crop_min": "smallest crop, as a share of the image's area " + RECIPE,
    "color": "strength of colour jitter and grayscale, 1 being the papers' " + RECIPE,
    "blur": "v2's Gaussian blur",
    "local_crops": "multi-crop (SwAV): this many small crops of each image as extra queries "
    "against its key (0: off; needs --augment batch)",
    "local_size": "side of the local crops in pixels (default: half of --image-size)",
    "bn_splits": "key-encoder BatchNorm groups emulating shuffle-BN on one device, 1: off "
    "(default: the most of 8, 4, 2 that split the batch per process evenly into groups of at "
    "least 4 images: 8 for the automatic batches from 32 up)",
    "sync_bn": "SyncBatchNorm across processes instead of shuffled keys",
    "adapt": ADAPT_HELP,
    "workers": "data-loading processes",
    "cache": "with --augment pil, keep decoded images in memory: auto (when under 2 GiB), on, off",
    "augment": "where views are augmented: batch (a batch at a time on the training device, "
    "from the decoded image store), pil (per image in --workers processes), or auto (batch; "
    "on CPU above 96 px pil, which measured faster there; pil when the store cannot be written)",
    "store_dir": "folder of the decoded image stores, one per data folder and size, reused by "
    "later runs (default: $MOCO_SEARCH_CACHE/stores or ~/.cache/moco-search/stores)",
    "seed": "random seed",
    "deterministic": "deterministic algorithms (slower; exact resume on CPU)",
    "resume": "continue the run in --out from its last checkpoint, with its saved settings",
    "init_from": "start from a checkpoint (this project's or an official MoCo one) (default: none)",
    "knn_k": "neighbours of the kNN monitor",
    "knn_t": "temperature of the kNN monitor",
    "val_dir": "ImageFolder tree for a kNN accuracy each epoch (training folders = labels) "
    "(default: none)",
    "monitor_images": "held-out images of the label-free monitor (0: off)",
    "device": "cpu, cuda, cuda:1 ... (default: cuda when available)",
    "amp": "bf16 autocast (default: on for CUDA, and from 48 px on CPUs with bf16 units: AMX, "
    "AVX-512 BF16)",
    "channels_last": "channels-last memory format",
    "compile": "torch.compile the encoders (measured no faster on 2 CPU cores; see docs)",
    "save_every": "also keep a numbered checkpoint every N epochs (0: last only)",
    "save_minutes": "also keep a numbered checkpoint at the first epoch end after every M minutes "
    "of the run (0: off); for a curve of a --minutes run on a small folder, where an epoch takes "
    "seconds and --save-every 1 would fill the disk",
    "max_steps": "at most this many steps per epoch (0: whole epoch; for tests)",
    "total_steps": "length of the schedule in steps (0: from the epochs; --minutes sets it)",
}


@contextmanager
def terminate_saves() -> Iterator[None]:
    """SIGTERM ends a run as Ctrl-C does, saving where it is: ``timeout``, ``docker stop``,
    systemd and a cluster's pre-emption send it, and the epoch in progress was lost."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a handler (a run started from a thread)
        return
    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _pretrain(args: argparse.Namespace) -> int:
    from moco.distributed import rank
    from moco.train import TrainConfig, log_summary, train

    with terminate_saves():
        ckpt = train(config_from_args(TrainConfig, args), given=getattr(args, "given", None))
    if rank() == 0:  # under torchrun, once
        print(log_summary(ckpt))
        print(f"next: moco-search export {ckpt} --out {ckpt.parent / 'encoder'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moco.encoder_config import describe_fit
    from moco.export import export_encoder

    cfg = export_encoder(
        args.checkpoint,
        args.out,
        image_size=args.image_size,
        half=args.half,
        pooling=args.pooling,
        fit=args.fit,
        fit_on=args.fit_on,
        fit_images=args.fit_images,
    )
    fit = cfg.fit
    fitted = (
        describe_fit(fit)
        if fit
        else "not centred (no training folder here; --fit-on DIR fits it on your images)"
    )
    print(
        f"encoder {cfg.arch} (small_stem={cfg.small_stem}, {cfg.feature_dim}-d {cfg.pooling}, "
        f"{cfg.image_size} px, {fitted}) written to {args.out}; sha256 {cfg.content_hash[:16]}"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this package's subcommands on the `moco-search` parser."""
    from moco.config import TrainConfig
    from moco.eval_cli import add_eval_command

    p = sub.add_parser(
        "pretrain",
        help="pretrain a MoCo encoder on a folder of images",
        description="Pretrain MoCo (v2 by default) on every image under DATA (recursive).",
    )
    add_dataclass_flags(p, TrainConfig, HELP, positional=("data",), skip=("out",))
    p.add_argument("--out", required=True, help="run directory for checkpoints and logs")
    p.set_defaults(run=_pretrain)

    p = sub.add_parser(
        "export",
        help="write the frozen encoder of a checkpoint",
        description="Export the query-encoder backbone (head removed) of a moco-search or official "
        "facebookresearch/moco checkpoint as model.safetensors + config.json, its features "
        "fitted to the run's training images by default (whitened, or centred when there are "
        "few); or export an encoder directory again with other options.",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint file (.pt / .pth.tar), a run directory (its last checkpoint), or an "
        "encoder directory (or its model.safetensors)",
    )
    p.add_argument("--out", required=True, help="encoder directory to write")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size to record (default: the training size, or 224 for official)",
    )
    p.add_argument("--half", action="store_true", help="store fp16 weights (default: fp32)")
    p.add_argument(
        "--pooling",
        choices=("auto", "avg", "gem", "stages"),
        default="auto",
        help="features: layer4 averaged (avg), its GeM (gem), or layer2-4 averaged and "
        "concatenated (stages: finds the same object more often, better probe); auto "
        "(default): stages for ResNet-18/34, avg for wider backbones",
    )
    p.add_argument(
        "--fit",
        choices=("auto", "none", "center", "whiten"),
        default="auto",
        help="map fitted on your images: center (subtract their mean feature), whiten (also "
        "even out the directions: better search and kNN; needs 2 images per dimension), "
        "none; auto (default): whiten if there are enough images, else center, and none "
        "when there is no folder to fit on",
    )
    p.add_argument(
        "--fit-on",
        default=None,
        metavar="DIR",
        help="images to fit on (default: the run's training folder)",
    )
    p.add_argument(
        "--fit-images",
        type=int,
        default=5000,
        metavar="N",
        help="fit on at most N of them, a fixed sample (default: 5000)",
    )
    p.set_defaults(run=_export)
    add_ablate_command(sub)
    add_eval_command(sub)


# --- ablate (issue 15) ------------------------------------------------------------------------


def _ablate(args: argparse.Namespace) -> int:
    from moco.ablate import ablate
    from moco.config import TrainConfig

    base = config_from_args(TrainConfig, args)
    report = ablate(base, args.mechanisms, args.k, args.momentum, args.momentum_k)
    out = args.out.rstrip("/")
    print((Path(out) / "ablation.md").read_text(), end="")
    print(f"wrote {out}/ablation.md, ablation.json, ablation.png ({len(report['cells'])} cells)")
    return 0


def _listed(kind: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            msg = f"not a comma-separated list of {kind.__name__}: {text}"
            raise argparse.ArgumentTypeError(msg) from None

    return parse


def add_ablate_command(sub: argparse._SubParsersAction) -> None:
    """Register ``ablate``: the paper's mechanism x K grid and momentum table on a folder."""
    from moco.config import MECHANISMS, TrainConfig

    p = sub.add_parser(
        "ablate",
        help="compare MoCo, end-to-end and memory bank (and MoCo's momentum) on a folder",
        description="Run the MoCo paper's ablations on DATA as pretrain runs with one budget "
        "each: the three mechanisms against the dictionary size K (Figure 3) and MoCo's "
        "momentum m at one K. Each cell is measured by the label-free monitor and, with "
        "--val-dir, kNN top-1; the tables and a plot are written to --out. Running it again "
        "continues an interrupted grid (docs/mechanisms.md).",
    )
    helps = {**HELP, "epochs": "passes over the images per cell (default: 10)"}
    skip = (
        "out",
        "resume",
        "mechanism",
        "moco_k",
        "save_every",
        "save_minutes",
        "max_steps",
        "total_steps",
    )
    add_dataclass_flags(p, TrainConfig, helps, positional=("data",), skip=skip)
    p.set_defaults(epochs=10)
    p.add_argument("--out", required=True, help="folder for the cells, tables and plot")
    p.add_argument(
        "--mechanisms",
        type=_listed(str),
        default=MECHANISMS,
        help="mechanisms of the K table, comma-separated (default: " + ",".join(MECHANISMS) + ")",
    )
    p.add_argument(
        "--k",
        type=_listed(int),
        default=(),
        help="dictionary sizes K, comma-separated; end-to-end trains with a batch of K "
        "(default: powers of two from 16 to a quarter of the images)",
    )
    p.add_argument(
        "--momentum",
        type=_listed(float),
        default=(0.0, 0.9, 0.99, 0.999, 0.9999),
        help="MoCo momenta of the momentum table, constant through each run; none: '' "
        "(default: 0,0.9,0.99,0.999,0.9999, the paper's)",
    )
    p.add_argument(
        "--momentum-k",
        type=int,
        default=0,
        help="K of the momentum table (default: the grid's K nearest a tenth of the images)",
    )
    p.set_defaults(run=_ablate)
