"""Does pretraining pay off? Pixels, random init, the official recipe and ours, on real images.

For each image set (an ImageFolder tree with a ``manifest.csv`` holding ``path``, ``class``,
``group_id``, ``split`` and, for emoji, ``vendor``: what ``../shared/datasets/make_*.py`` write),
the benchmark
1. links the ``train`` split into a training tree under ``--cache`` (the ``query`` split is never
   trained on),
2. pretrains each recipe for ``--minutes`` with ``moco-search pretrain --minutes``, or for
   ``--steps`` steps (equal work, whatever the machine's pace that hour); about ten checkpoints
   a run; runs already in the cache are reused,
3. measures on frozen features, for every checkpoint and the baselines:
   - instance R@1 / R@10 across renderings (sets with a ``vendor`` column): each ``query``
     image of one vendor searches every image of the other vendors; the same ``group_id``
     (the same emoji) is the hit. Whole emoji are held out by the split.
   - category kNN top-1 (k=200, T=0.1) and linear-probe top-1 (L-BFGS on cached features):
     train split -> query split, labels = ``class``,
   each checkpoint exported as ``moco-search export`` does (``--fit``, ``--pooling``: export's
   defaults unless given; ``--eval-size``). The baselines are measured raw, as the
   issue defines them, and with the same map fitted on their train-split features,
4. writes JSON (each point with its minutes and steps) and one PNG (each metric against
   wall-clock minutes, or steps) to ``bench/results/``.

    python bench/quality.py emoji=/data/emoji mnist5k=/data/mnist5k --minutes 15
    python bench/quality.py emoji=/data/emoji --build ../shared/datasets   # build if missing
    python bench/quality.py --demo    # the README's table for the shipped demo encoder
    python bench/quality.py --merge results/quality_A.json results/quality_B.json  # one plot

The data sets are never shipped and never read by the tests.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moco import whiten  # noqa: E402
from moco.data import ImageError, load_image  # noqa: E402
from moco.encoders import default_pooling, with_pooling  # noqa: E402
from moco.evaluate import load_featurizer  # noqa: E402
from moco.export import export_encoder, read_encoder_config  # noqa: E402
from moco.knn import knn_predict  # noqa: E402
from moco.metrics import retrieval_metrics  # noqa: E402
from moco.preprocess import eval_transform  # noqa: E402
from moco.probe import ProbeConfig, train_probe  # noqa: E402
from moco.trainlog import epoch_numbers, read_log  # noqa: E402

SHIPPED = ROOT / "app" / "demo" / "encoder"

# Flags of each recipe beyond --minutes. "official": facebookresearch/moco's CIFAR-10 demo
# (colab/moco_cifar10_demo.ipynb: resnet18, lr 0.06 at batch 512, wd 5e-4, K=4096, m=0.99,
# T=0.1, linear head, no blur, cosine) at our CPU image size and batch 64 (lr scaled linearly;
# our CPU default was 64 until 2026-12-06, and the comparisons since keep it there).
RECIPES: dict[str, dict[str, Any]] = {
    "ours": {},
    "official": dict(
        moco_k=4096,
        moco_m=0.99,
        m_schedule="constant",
        moco_t=0.1,
        mlp=False,
        blur=False,
        weight_decay=5e-4,
        lr=0.06 * 64 / 512,
        batch_size=64,
        warmup_epochs=0.0,
        crop_min=0.2,
        color=1.0,
    ),
}
METRICS = ("instance_R@1", "instance_R@10", "knn_top1", "probe_top1")


def read_manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def build_if_missing(name: str, root: Path, scripts: Path | None) -> None:
    """Run ``scripts/make_<name>.py root`` when ``root`` holds no manifest yet."""
    if (root / "manifest.csv").is_file():
        return
    if scripts is None:
        raise SystemExit(f"{root}/manifest.csv not found; pass --build DIR of make_*.py")
    subprocess.run([sys.executable, str(scripts / f"make_{name}.py"), str(root)], check=True)


def train_tree(root: Path, rows: list[dict[str, str]], out: Path) -> Path:
    """Symlinks to the train split, as CLASS/FILE (the pretraining never sees a query image)."""
    for r in rows:
        if r["split"] != "train":
            continue
        link = out / r["class"] / Path(r["path"]).name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((root / r["path"]).resolve(), link)
    return out


# what auto_config sets from the recipe's flags and the defaults and the training depends on
# (amp follows the CPU, not the recipe; embed_size only export, which the benchmark sets)
RECIPE_FIELDS = (
    "image_size",
    "small_stem",
    "batch_size",
    "moco_k",
    "moco_m",
    "lr",
    "crop_min",
    "color",
    "moco_t",
)


def pretrain(
    data: Path, run: Path, recipe: str, minutes: float, extra: dict[str, Any], steps: int = 0
) -> Path:
    """``run`` trained with ``recipe`` for ``minutes``, or for ``steps`` steps when given (the
    cache's copy when it has one). A step budget compares recipes at equal work, whatever the
    machine's pace that hour; the minutes are what a user's ``--minutes`` gets."""
    from moco.train import TrainConfig, train

    cfg = TrainConfig(data=str(data), out=str(run), workers=1, **{**RECIPES[recipe], **extra})
    full, images = resolved(cfg)
    if steps:
        cfg = dataclasses.replace(cfg, **step_budget(cfg, steps, full.batch_size, images))
    else:
        # ten points a curve, whatever an epoch takes
        cfg = dataclasses.replace(cfg, minutes=minutes, save_minutes=minutes / 10)
    if (run / "checkpoint_last.pt").is_file():
        check_cached(run, full)
        return run  # reuse: the cache holds it already
    train(cfg)
    return run


def resolved(cfg: Any) -> tuple[Any, int]:
    """``cfg`` as ``train`` resolves it on CPU (``auto_config``), and its training images."""
    from moco.data import list_images
    from moco.recipe import auto_config
    from moco.trainset import holdout

    paths, _, _ = holdout(list_images(cfg.data), cfg)
    return auto_config(cfg, len(paths), "cpu"), len(paths)


def step_budget(cfg: Any, steps: int, batch: int, images: int) -> dict[str, Any]:
    """The fields that make ``cfg`` (``batch`` images a step, ``images`` to train on) a run of
    ``steps`` steps shaped as a ``--minutes`` run: its cosine ends at the last step, its warm-up
    is the recipe's (else ``--minutes``' 5%), and about ten checkpoints fall along it."""
    from moco.recipe import warmup_epochs

    per_epoch = max(images // batch, 1)
    epochs = -(-steps // per_epoch)
    warmup = warmup_epochs(cfg.warmup_epochs, steps, per_epoch)
    return dict(
        total_steps=steps, epochs=epochs, warmup_epochs=warmup, save_every=max(epochs // 10, 1)
    )


def check_cached(run: Path, want: Any) -> None:
    """Refuse a cached run whose recipe is no longer what its name gives (a default changed
    since it trained, e.g. ``ours`` before T = 0.1): its numbers would be labelled wrongly.
    ``want``: the recipe's config as ``train`` resolves it (``resolved``)."""
    saved = json.loads((run / "config.json").read_text())
    stale = {
        k: (saved.get(k), getattr(want, k))
        for k in RECIPE_FIELDS
        if saved.get(k) != getattr(want, k)
    }
    if stale:
        diff = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in stale.items())
        raise SystemExit(
            f"{run} was trained with another recipe than its name gives now ({diff}): move "
            "it aside (its results JSON keeps its numbers) or pass another --cache"
        )


def checkpoints(run: Path) -> list[tuple[float, int, Path]]:
    """(wall-clock minutes since the start of the run, steps trained, checkpoint) for each
    saved epoch, the last one (``checkpoint_last.pt``) included."""
    rows = read_log(run)
    out = []
    steps = 0
    for r, epoch in zip(rows, epoch_numbers(rows), strict=True):
        steps += int(r.get("steps", 0))
        ckpt = run / f"checkpoint_{epoch:04d}.pt"
        if ckpt.is_file():
            out.append((r["elapsed_s"] / 60, steps, ckpt))
    if rows and not (out and out[-1][0] == rows[-1]["elapsed_s"] / 60):
        out.append((rows[-1]["elapsed_s"] / 60, steps, run / "checkpoint_last.pt"))
    return out


def sample_train(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """Every held-out row and ``n`` train rows drawn with a fixed seed (0: all of them).

    The train rows are the kNN bank, the probe's training set and, for instance retrieval,
    distractors; a sample of them makes each measurement a few times cheaper.
    """
    train = [r for r in rows if r["split"] == "train"]
    if n <= 0 or n >= len(train):
        return rows
    import random

    return [r for r in rows if r["split"] != "train"] + random.Random(0).sample(train, n)


def thin(points: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``points``, evenly spread, always with the first and the last."""
    if n <= 0 or len(points) <= n:
        return points
    if n == 1:
        return points[-1:]
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


class Images:
    """Every image of a set decoded once (downscaled), with its manifest row."""

    def __init__(self, root: Path, rows: list[dict[str, str]], size: int) -> None:
        self.rows, self.images = [], []
        for r in rows:
            try:
                im = load_image(root / r["path"], draft_size=size)
            except ImageError:
                continue
            im.thumbnail((size, size))
            self.rows.append(r)
            self.images.append(im)

    def column(self, name: str) -> np.ndarray:
        return np.array([r.get(name, "") for r in self.rows])


@torch.inference_mode()
def features(model: nn.Module, transform: Any, images: Images) -> torch.Tensor:
    out = []
    for i in range(0, len(images.images), 256):
        x = torch.stack([transform(im) for im in images.images[i : i + 256]])
        out.append(model(x).float())
    return F.normalize(torch.cat(out), dim=1)


def instance_retrieval(feats: torch.Tensor, images: Images) -> dict[str, float]:
    """R@1/R@10 of each query-split image against all images of the other vendors."""
    vendor, group, split = (
        images.column("vendor"),
        images.column("group_id"),
        images.column("split"),
    )
    _, gid = np.unique(group, return_inverse=True)
    hits: dict[str, list[float]] = {"instance_R@1": [], "instance_R@10": []}
    for v in sorted(set(vendor)):
        q = np.flatnonzero((vendor == v) & (split != "train"))
        g = np.flatnonzero(vendor != v)
        if not len(q) or not len(g):
            continue
        sim = (feats[q] @ feats[g].T).numpy()
        m = retrieval_metrics(sim, gid[q], gid[g], ks=(1, 10))
        n = m["queries"]
        hits["instance_R@1"].append(m["recall@1"] * n)
        hits["instance_R@10"].append(m["recall@10"] * n)
        hits.setdefault("n", []).append(n)
    total = sum(hits.pop("n", [0]))
    return {k: sum(v) / max(total, 1) for k, v in hits.items()} | {"instance_queries": total}


def categories(feats: torch.Tensor, images: Images) -> dict[str, float]:
    """kNN and linear-probe top-1 of the query split, trained on the train split."""
    labels, split = images.column("class"), images.column("split")
    classes, y = np.unique(labels, return_inverse=True)
    tr, va = split == "train", split != "train"
    knn = knn_predict(feats[tr], y[tr], feats[va], num_classes=len(classes), k=200, T=0.1)
    probe = train_probe(feats[tr].numpy(), y[tr], ProbeConfig.fast(), classes=list(classes))
    with torch.inference_mode():
        scores = probe(feats[va])
    return {
        "knn_top1": 100.0 * float((knn.argmax(1).numpy() == y[va]).mean()),
        "probe_top1": 100.0 * float((scores.argmax(1).numpy() == y[va]).mean()),
    }


def measure(
    spec: str, images: Images, size: int | None, pooling: str = "avg", fit: str = "none"
) -> dict[str, Any]:
    """All metrics of one encoder directory or baseline spec (see ``load_featurizer``);
    ``fit`` maps a baseline's features as ``export --fit`` maps an encoder's, fitted on the
    train split."""
    model, enc, name = load_featurizer(spec, image_size=size if spec == "pixels" else None)
    if size and spec != "pixels":
        enc = dataclasses.replace(enc, image_size=size, crop_pct=1.0)
    if pooling == "auto":
        pooling = default_pooling(enc.arch) if spec != "pixels" else "avg"
    if pooling != "avg":
        model = with_pooling(model, pooling)
    t0 = time.perf_counter()
    feats = features(model.eval(), eval_transform(enc), images)
    train = torch.from_numpy(images.column("split") == "train")
    mapped = whiten.fit_map(feats[train], fit)
    feats = whiten.wrap(nn.Identity(), mapped)(feats)
    row: dict[str, Any] = {"encoder": name, "image_size": enc.image_size, "pooling": pooling}
    row |= {"fit": whiten.kind(mapped)}
    if "vendor" in images.rows[0]:
        row |= instance_retrieval(feats, images)
    return row | categories(feats, images) | {"eval_s": round(time.perf_counter() - t0, 1)}


def measured(
    cache: Path, spec: str, images: Images, size: int | None, pooling: str, fit: str = "none"
) -> dict[str, Any]:
    """``measure``, remembered in ``cache`` (a JSON file) so that a re-run reuses it."""
    if cache.is_file():
        return json.loads(cache.read_text())
    row = measure(spec, images, size=size, pooling=pooling, fit=fit)
    cache.write_text(json.dumps(row) + "\n")
    return row


def fits(fit: str) -> list[tuple[str, str]]:
    """The maps a baseline is measured with, and their cache-file suffixes: raw, and ``fit``'s
    ("auto": whitened when its train split has enough images for its width, else centred)."""
    return [("none", "")] + ([(fit, f"_{fit}")] if fit != "none" else [])


def run_config(run: Path) -> dict[str, Any]:
    return json.loads((run / "config.json").read_text())


def embed_size(run: Path) -> int:
    """The size the run's exported encoder embeds at (``export``'s default)."""
    cfg = run_config(run)
    return int(cfg.get("embed_size") or cfg["image_size"])


def random_spec(run: Path) -> str:
    cfg = run_config(run)
    stem = cfg.get("small_stem")
    return f"random:{cfg['arch']}" + (":small" if stem else "")


def plot(results: dict[str, Any], path: Path, x: str = "minutes") -> Path:
    """Each metric against ``x`` (a point's "minutes" or "steps"), baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    fig, axes = plt.subplots(
        len(sets), len(METRICS), figsize=(4 * len(METRICS), 3 * len(sets)), squeeze=False
    )
    for i, name in enumerate(sets):
        for j, metric in enumerate(METRICS):
            ax = axes[i][j]
            if not any(metric in b for b in results[name]["baselines"]):
                ax.axis("off")  # a set without this measure (no renderings to search across)
                continue
            for base in results[name]["baselines"]:
                if metric in base:
                    fit = base.get("fit", "none")
                    ax.axhline(
                        base[metric],
                        ls="--" if fit == "none" else ":",
                        lw=1,
                        label=base["encoder"] + ("" if fit == "none" else f", {fit}"),
                        color="grey" if base["encoder"].startswith("pixels") else "black",
                    )
            # minute 0 of every run is the random-init network (same seed, same backbone, the
            # same map as the runs' encoders: the last baseline measured)
            start = [b for b in results[name]["baselines"] if b["encoder"].startswith("random")]
            start = start[-1:]
            for recipe, pts in results[name]["runs"].items():
                if pts and metric in pts[0]:
                    pts = [{"minutes": 0.0, "steps": 0, **start[0]}, *pts] if start else pts
                    ax.plot(
                        [p[x] for p in pts],
                        [p[metric] for p in pts],
                        marker="o",
                        label=recipe,
                    )
            label = "steps" if x == "steps" else "wall-clock minutes (2 CPU cores)"
            ax.set(title=f"{name}: {metric}", xlabel=label)
            ax.set_xlim(left=0)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for item in args.sets:
        name, _, root_text = item.partition("=")
        root = Path(root_text).expanduser()
        build_if_missing(name, root, args.build)
        rows = read_manifest(root)
        cache = args.cache / name
        data = train_tree(root, rows, cache / "train")
        budget = f"{args.steps}s" if args.steps else f"{args.minutes:g}m"
        runs = {
            r: pretrain(data, cache / f"{r}_{budget}", r, args.minutes, {}, args.steps)
            for r in args.recipes
        }
        images = Images(
            root, sample_train(rows, args.train_sample), size=2 * max(args.eval_size or 64, 64)
        )
        first = next(iter(runs.values()))
        spec, size, pool = random_spec(first), args.eval_size or embed_size(first), args.pooling
        n = args.train_sample
        baselines = []
        for base, side, how in (("pixels", args.pixels_size, "avg"), (spec, size, pool)):
            for fit, suffix in fits(args.fit):
                file = cache / f"{base.replace(':', '_')}_{side}_{how}{suffix}_{n}.json"
                try:
                    baselines.append(measured(file, base, images, side, how, fit))
                except ValueError as e:  # too few images to whiten features this wide
                    print(f"{file.name} skipped: {e}", flush=True)
        curves: dict[str, list[dict[str, Any]]] = {}
        for recipe, run in runs.items():
            curves[recipe] = []
            for minutes, steps, ckpt in thin(checkpoints(run), args.max_points):
                # exported as `moco-search export` would, with --image-size/--pooling/--fit
                key = f"{args.eval_size or 'export'}_{args.pooling}_{args.fit}"
                enc = ckpt.with_name(f"{ckpt.stem}_{key}.enc")
                if not enc.is_dir():
                    export_encoder(
                        ckpt, enc, args.eval_size, pooling=args.pooling, fit=args.fit, fit_on=data
                    )
                row = measured(enc / f"metrics_{n}.json", str(enc), images, None, "avg")
                row |= {"pooling": args.pooling, "fit": read_encoder_config(enc).fit}
                curves[recipe].append({"minutes": round(minutes, 2), "steps": steps, **row})
                print(name, recipe, json.dumps(curves[recipe][-1]), flush=True)
        results[name] = {
            "root": str(root),
            "images": len(images.rows),
            "baselines": baselines,
            "runs": curves,
        }
        print(name, "baselines", json.dumps(baselines), flush=True)
    return results


def merge(paths: list[Path], results_dir: Path) -> Path:
    """One JSON and one PNG from several outputs of this script, e.g. one per budget: each curve
    is named by its recipe and budget; a set's baselines are from the first file that has it.
    The files must embed at the same size (their baselines are measured at it)."""
    sets: dict[str, Any] = {}
    metas = [json.loads(p.read_text()) for p in paths]
    for d in metas:
        for name, data in d["sets"].items():
            merged = sets.setdefault(name, {**data, "runs": {}})
            sizes = [[b["image_size"] for b in x["baselines"]] for x in (merged, data)]
            if sizes[0] != sizes[1]:
                raise SystemExit(f"--merge: {name} is embedded at different sizes {sizes}")
            steps = d["meta"].get("steps")
            budget = f"{steps} steps" if steps else f"{d['meta']['minutes']:g} min"
            for recipe, points in data["runs"].items():
                merged["runs"][f"{recipe}, {budget}"] = points
    meta = {**metas[0]["meta"], "merged": [str(p) for p in paths]}
    out = results_dir / f"quality_merged_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.write_text(json.dumps({"meta": meta, "sets": sets}, indent=2) + "\n")
    print(f"wrote {out}\nwrote {plot(sets, out.with_suffix('.png'))}")
    return out


def demo(results_dir: Path) -> None:
    """The README's table: the shipped demo encoder as the demo runs it (export's defaults,
    fitted here on the train split only) and as shipped, against pixels and random init at
    its input size, raw and centred."""
    import tempfile

    from app.demo import fitted_encoder
    from app.demo.split import write_split
    from moco import read_encoder_config
    from moco.evaluate import EvalConfig, evaluate_many, format_table, write_json

    size = read_encoder_config(SHIPPED).image_size
    cfg = EvalConfig(probe=ProbeConfig.preset("fast"), image_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        train, val = Path(tmp) / "train", Path(tmp) / "val"
        write_split(Path(tmp))
        fitted = fitted_encoder(SHIPPED, train, Path(tmp))  # the demo's own fit, on train only
        baselines = ["pixels", "pixels+center", "random:resnet18", "random:resnet18+center"]
        rows = evaluate_many([str(fitted), str(SHIPPED), *baselines], train, val, cfg)
        rows[0]["encoder"] = "encoder, as the demo runs it"
    print(format_table(rows))
    stamp = time.strftime("%Y%m%d_%H%M%S")
    print(f"wrote {write_json(rows, results_dir / f'quality_demo_{stamp}.json')}")


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """``"t01:moco_t=0.1,blur=false"`` -> ("t01", {"moco_t": 0.1, "blur": False}), checked
    against ``TrainConfig``'s fields, so that an ablation row is one flag of the shipped script."""
    from moco.config import TrainConfig

    name, _, body = text.partition(":")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key not in fields:
            raise argparse.ArgumentTypeError(f"{key!r} is not a TrainConfig field")
        value: Any = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        flags[key] = value
    if not name:
        raise argparse.ArgumentTypeError("a recipe needs a NAME: before its flags")
    return name, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="*", help="NAME=ROOT of each image set (emoji=/data/emoji)")
    parser.add_argument(
        "--minutes", type=float, default=15, help="budget of each run (default: 15)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="instead of --minutes: train each recipe for this many steps (its warm-up and "
        "cosine fitted to them), to compare recipes at equal work whatever the machine's pace",
    )
    parser.add_argument(
        "--recipes",
        type=lambda s: s.split(","),
        default=["ours", "official"],
        help="comma-separated, of: " + ", ".join(RECIPES) + " (default: both)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/moco-search/bench").expanduser(),
        help="training trees and runs (default: ~/.cache/moco-search/bench)",
    )
    parser.add_argument(
        "--build",
        type=Path,
        default=None,
        help="folder of make_<name>.py to build missing sets (default: none)",
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help="embed at this size (default: the exported encoder's, i.e. the run's embed_size)",
    )
    parser.add_argument(
        "--pooling",
        default="auto",
        choices=("auto", "avg", "gem", "stages"),
        help="avg, gem, or stages (layer2-4 pooled and concatenated) (default: auto, "
        "export's: stages for ResNet-18/34)",
    )
    parser.add_argument(
        "--fit",
        default="auto",
        choices=whiten.FITS,
        help="export's map (default: auto, export's: whitened on the training tree when it "
        "has 2 images per dimension, else centred)",
    )
    parser.add_argument(
        "--pixels-size", type=int, default=32, help="pixel baseline side (default: 32)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "results",
        help="output folder (default: bench/results)",
    )
    parser.add_argument(
        "--max-points",
        type=int,
        default=4,
        help="checkpoints measured per run, evenly spread (default: 4; 0: all)",
    )
    parser.add_argument(
        "--train-sample",
        type=int,
        default=0,
        help="measure with this many train-split images, drawn with seed 0 (default: 0 = all)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        type=parse_recipe,
        metavar="NAME[=BASE]:FLAG=VALUE,...",
        help="define a recipe from TrainConfig fields, to name in --recipes (e.g. "
        "t01:moco_t=0.1; NAME=BASE: starts from recipe BASE, e.g. official32=official:"
        "image_size=32); repeatable",
    )
    parser.add_argument("--demo", action="store_true", help="only the demo encoder's table")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="instead: one JSON and PNG from outputs of this script (one per budget)",
    )
    args = parser.parse_args()
    for spec, flags in args.recipe:
        name, _, base = spec.partition("=")  # NAME=BASE: BASE's flags, then these
        if base and base not in RECIPES:
            parser.error(f"--recipe {spec}: unknown base recipe {base!r}")
        RECIPES[name] = {**RECIPES.get(base, {}), **flags}
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(
            f"unknown recipe {unknown[0]!r}: define it with --recipe or use one of "
            + ", ".join(RECIPES)
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.demo:
        demo(args.results)
        return
    if args.merge:
        merge(args.merge, args.results)
        return
    if not args.sets:
        parser.error("give at least one NAME=ROOT image set (or --demo)")
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    stamp = time.strftime("%Y%m%d_%H%M%S")
    results = run_benchmark(args)
    meta = {
        "minutes": 0 if args.steps else args.minutes,
        "steps": args.steps,
        "recipes": args.recipes,
        "eval_size": args.eval_size,
        "pooling": args.pooling,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    out = args.results / f"quality_{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "sets": results}, indent=2) + "\n")
    png = plot(results, args.results / f"quality_{stamp}.png", "steps" if args.steps else "minutes")
    print(f"wrote {out}\nwrote {png}")


if __name__ == "__main__":
    main()
