"""How good is an encoder? kNN, linear probe and retrieval on labelled folders, plus baselines.

``evaluate`` reads two ImageFolder trees (one subfolder per class), embeds them with the encoder's
own ``eval_transform`` and reports, on the validation tree:
    knn_top1: weighted kNN classifier (k=200, T=0.1), no training (moco.knn).
    probe_top1/probe_top5: linear classifier on frozen features (moco.probe), cached features by
        default or MoCo's full protocol (``protocol="paper"``).
    mAP@10, recall@1/5/10: each validation image queries the training images; same label =
        relevant.
    view_recall@1: label-free; the share of held-out images whose second augmented view
        (moco_transform) is the nearest neighbour of the first. Needs no labels at all.
Baselines make the numbers mean something: ``"pixels"`` (downscaled pixel vectors) and
``"random:ARCH[:small]"`` (the same architecture with random weights), or ``"random:ENCODER_DIR"``
(the encoder's own network, input size and pooling with random weights: ``eval``'s default).
Pretraining that does not beat them has not learned anything useful for these images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from moco import whiten
from moco.augment import moco_transform
from moco.config import KNN_K, KNN_T
from moco.data import ImageFiles, list_images, shared_files
from moco.distributed import default_device
from moco.encoders import build_encoder, check_arch, feature_dim, pooled_dim, with_pooling
from moco.export import EncoderConfig, load_encoder, read_encoder_config
from moco.knn import knn_predict
from moco.metrics import classification_metrics, retrieval_metrics
from moco.preprocess import eval_transform
from moco.probe import ProbeConfig, train_probe
from moco.probe_images import collate_indexed, paper_train_transform, train_probe_on_images

log = logging.getLogger(__name__)

PROTOCOLS = ("cached", "paper")
PIXELS_SIZE = 16
"""Side of the pixel baseline: 16x16x3 = 768 numbers, about the width of a ResNet feature."""


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``evaluate``; the probe preset follows ``protocol`` unless ``probe`` is given."""

    protocol: str = "cached"
    k: int = KNN_K
    T: float = KNN_T
    probe: ProbeConfig | None = None
    batch_size: int = 64
    device: str = "cpu"
    workers: int = 0
    monitor_size: int = 256
    image_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Unknown protocol {self.protocol!r}; valid: {PROTOCOLS}")
        default_device(self.device)  # refuses one that is not, or not here
        if not (self.T > 0 and math.isfinite(self.T)):  # said now, not after the features
            raise ValueError(f"--t must be a number > 0, got {self.T}")
        for flag, value, least in (
            ("k", self.k, 1),
            ("batch-size", self.batch_size, 1),
            ("workers", self.workers, 0),
            ("image-size", self.image_size, 8),
            ("monitor-size", self.monitor_size, 0),
        ):
            if value is not None and value < least:  # torch's words, or 0 meaning the default
                raise ValueError(f"--{flag} must be >= {least}, got {value}")

    def probe_config(self) -> ProbeConfig:
        if self.probe is not None:
            return self.probe
        return ProbeConfig.paper() if self.protocol == "paper" else ProbeConfig.fast()


def image_folder(
    root: str | os.PathLike, classes: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images of an ImageFolder tree, their class indexes, and the class names (subfolders).

    With ``classes`` given (the training tree's), images of other classes are left out, since
    no classifier trained on ``classes`` can predict them.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    names = list(classes) if classes is not None else found
    extra = sorted(set(found) - set(names))
    if extra:
        log.warning("%s: leaving out classes absent from training: %s", root, extra[:10])
    paths: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(names):
        if (root / name).is_dir():
            files = list_images(root / name)
            paths += files
            labels += [i] * len(files)
    if not paths:
        raise ValueError(f"No images in class subfolders of {root} (expected ROOT/CLASS/IMAGE)")
    return paths, np.array(labels, dtype=np.int64), names


def load_featurizer(
    spec: str | os.PathLike, device: str = "cpu", image_size: int | None = None, seed: int = 0
) -> tuple[nn.Module, EncoderConfig, str]:
    """A frozen feature extractor, its preprocessing config, and a display name.

    Args:
        spec: an encoder directory, ``"pixels"`` (downscaled pixels), ``"random:ARCH[:small]"``
            (randomly initialised ARCH, with the small-image stem if ``:small``) or
            ``"random:ENCODER_DIR"`` (``random_like``).
        image_size: input side for the baselines (pixels: 16; random:ARCH: 32 with the small
            stem, else 224; random:ENCODER_DIR: the encoder's).
    """
    text = str(spec)
    if text == "pixels":
        size = image_size or PIXELS_SIZE
        cfg = EncoderConfig(
            arch="pixels",
            feature_dim=3 * size * size,
            image_size=size,
            crop_pct=1.0,
            source="baseline",
        )
        return nn.Flatten().eval(), cfg, f"pixels {size}x{size}"
    if text.startswith("random:") and Path(text[7:]).is_dir():
        return random_like(text[7:], device=device, image_size=image_size, seed=seed)
    if text.startswith("random:"):
        parts = text.split(":")
        small = parts[2:] == ["small"]
        if len(parts) not in (2, 3) or (len(parts) == 3 and not small):
            raise ValueError(
                f"Bad baseline {text!r}; expected random:ARCH, random:ARCH:small or "
                "random:ENCODER_DIR"
            )
        torch.manual_seed(seed)
        model = build_encoder(parts[1], num_classes=0, small_stem=small)
        model.requires_grad_(False)
        cfg = EncoderConfig(
            arch=parts[1],
            small_stem=small,
            feature_dim=feature_dim(parts[1]),
            image_size=image_size or (32 if small else 224),
            crop_pct=1.0 if small else 0.875,
            source="random-init",
            content_hash=f"random-init-seed{seed}",
        )
        return model.eval().to(device), cfg, f"random-init {text[7:]}"
    model, cfg = load_encoder(text, device=device)
    return model, cfg, Path(text).name


def random_like(
    encoder: str | os.PathLike, device: str = "cpu", image_size: int | None = None, seed: int = 0
) -> tuple[nn.Module, EncoderConfig, str]:
    """The encoder directory's network with random weights: its architecture, stem, pooling,
    input size and preprocessing, without its map (a baseline gets its own, ``+center``).

    The bar an encoder's training must clear is the same network untrained, seen the same way:
    a 64-px encoder pooled over layers 2-4 measured beside a 224-px average-pooled random
    network would compare the preprocessing as much as the training.
    """
    enc = read_encoder_config(encoder)
    torch.manual_seed(seed)
    model = with_pooling(
        build_encoder(enc.arch, num_classes=0, small_stem=enc.small_stem), enc.pooling
    )
    model.requires_grad_(False)
    cfg = dataclasses.replace(
        enc,
        image_size=image_size or enc.image_size,
        feature_dim=pooled_dim(enc.arch, enc.pooling),
        fit={},
        source="random-init",
        content_hash=f"random-init-seed{seed}",
        training={},
    )
    stem = ":small" if enc.small_stem else ""
    name = f"random-init {enc.arch}{stem} ({cfg.image_size} px, {enc.pooling} pooling)"
    return model.eval().to(device), cfg, name


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    transform: Callable[[Any], torch.Tensor],
    paths: Sequence[Path],
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    progress: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Features (NxD float32, unnormalised) of the readable ``paths`` and their indexes.

    Unreadable files are skipped (``moco.load_image`` decides), so the result may be shorter
    than ``paths``; the second array says which paths the rows belong to. A ``progress`` label
    shows a progress bar (images) under it.
    """
    loader = torch.utils.data.DataLoader(
        ImageFiles(list(paths), transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_indexed,
    )
    model = model.eval()
    feats, kept = [], []
    bar = tqdm(total=len(paths), unit="img", desc=progress, leave=False, disable=not progress)
    with bar:  # closed on Ctrl-C too, so the message after it starts on a line of its own
        for batch in loader:
            bar.update(min(batch_size, len(paths) - bar.n))
            if batch is None:
                continue
            x, idx = batch
            feats.append(model(x.to(device)).float().cpu().numpy())
            kept.append(idx.numpy())
    if not feats:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(feats), np.concatenate(kept).astype(np.int64)


def view_recall(
    model: nn.Module,
    cfg: EncoderConfig,
    paths: Sequence[Path],
    n: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
) -> tuple[float, int]:
    """Label-free monitor: recall@1 (percent) of each image's other augmented view.

    Two MoCo v2 views of each of ``n`` images; for each first view, is the nearest second view
    (among the ``n``) that of the same image? Chance is 1/n. Returns (recall, images used).
    """
    rng = np.random.default_rng(seed)
    chosen = [paths[i] for i in sorted(rng.permutation(len(paths))[:n])]
    aug = moco_transform(cfg.image_size, mean=tuple(cfg.mean), std=tuple(cfg.std))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        a, ia = extract_features(model, aug, chosen, batch_size=batch_size, device=device)
        b, ib = extract_features(model, aug, chosen, batch_size=batch_size, device=device)
    if len(a) < 2 or not np.array_equal(ia, ib):
        return float("nan"), len(a)
    sim = F.normalize(torch.from_numpy(a), dim=1) @ F.normalize(torch.from_numpy(b), dim=1).T
    return 100.0 * (sim.argmax(1) == torch.arange(len(a))).float().mean().item(), len(a)


def evaluate(
    encoder: str | os.PathLike,
    train_dir: str | os.PathLike,
    val_dir: str | os.PathLike,
    cfg: EvalConfig | None = None,
    *,
    outcomes: bool = False,
) -> dict[str, Any]:
    """All metrics of one encoder (or baseline spec, see ``load_featurizer``) as a flat dict.

    ``outcomes`` adds each validation image's result (kNN and probe right, nearest training
    image of its class) under ``"outcomes"``, so that two encoders can be compared query by
    query (``bench/paired.py``): on a few hundred images their difference is often inside
    each one's own interval and yet consistent across the queries they disagree on.

    Examples:
        >>> r = evaluate("models/demo", "data/train", "data/val")  # doctest: +SKIP
        >>> r["knn_top1"], r["probe_top1"], r["mAP@10"], r["view_recall@1"]
    """
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    tr_paths, tr_y, classes = image_folder(train_dir)
    va_paths, va_y, _ = image_folder(val_dir, classes=classes)
    spec, fit = split_fit(encoder)
    model, enc, name = load_featurizer(
        spec, device=cfg.device, image_size=cfg.image_size, seed=cfg.seed
    )
    tf = eval_transform(enc)
    kw = {"batch_size": cfg.batch_size, "device": cfg.device, "workers": cfg.workers}
    tr_x, tr_kept = extract_features(model, tf, tr_paths, **kw)
    va_x, va_kept = extract_features(model, tf, va_paths, **kw)
    if len(tr_x) == 0 or len(va_x) == 0:
        raise ValueError(f"No readable images in {train_dir if len(tr_x) == 0 else val_dir}")
    if fit != "none":  # a baseline given the map an encoder's export fitted (moco.whiten)
        model, tr_x, va_x = fit_baseline(model, tr_x, va_x, fit=fit, device=cfg.device)
        name = f"{name}, {'centred' if fit == 'center' else 'whitened'}"
    tr_y, va_y = tr_y[tr_kept], va_y[va_kept]
    c = len(classes)

    knn = knn_predict(tr_x, tr_y, va_x, num_classes=c, k=cfg.k, T=cfg.T).numpy()
    pcfg = cfg.probe_config()
    if cfg.protocol == "paper":
        probe = train_probe_on_images(
            model,
            [tr_paths[i] for i in tr_kept],
            tr_y,
            paper_train_transform(enc),
            pcfg,
            classes=classes,
            encoder_hash=enc.content_hash,
            dim=enc.feature_dim,
            device=cfg.device,
            workers=cfg.workers,
        )
    else:
        probe = train_probe(tr_x, tr_y, pcfg, classes=classes, encoder_hash=enc.content_hash)
    with torch.inference_mode():
        probe_scores = probe.to("cpu")(torch.from_numpy(va_x)).numpy()
    probe_m = classification_metrics(probe_scores, va_y, classes)
    sim = (
        F.normalize(torch.from_numpy(va_x), dim=1) @ F.normalize(torch.from_numpy(tr_x), dim=1).T
    ).numpy()
    retrieval = retrieval_metrics(sim, va_y, tr_y, ks=(1, 5, 10))
    monitor, monitor_n = view_recall(
        model,
        enc,
        [va_paths[i] for i in va_kept],
        n=cfg.monitor_size,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )
    row: dict[str, Any] = {
        "encoder": name,
        "spec": str(encoder),
        "arch": enc.arch,
        "content_hash": enc.content_hash,
        "image_size": enc.image_size,
        "classes": c,
        "n_train": len(tr_x),
        "n_val": len(va_x),
        "skipped": (len(tr_paths) - len(tr_x)) + (len(va_paths) - len(va_x)),
        "knn_top1": 100.0 * float((knn.argmax(1) == va_y).mean()),
        "knn_k": min(cfg.k, len(tr_x)),
        "probe_protocol": cfg.protocol,
        "probe_top1": probe_m.top1,
        "probe_top5": probe_m.top5,
        "probe_top1_ci": list(probe_m.top1_ci),
        "mAP@10": retrieval["mAP@10"],
        "recall@1": retrieval["recall@1"],
        "recall@5": retrieval["recall@5"],
        "recall@10": retrieval["recall@10"],
        "view_recall@1": monitor,
        "monitor_images": monitor_n,
        "seconds": round(time.perf_counter() - t0, 2),
        "probe_config": dataclasses.asdict(pcfg),
    }
    if outcomes:
        row["outcomes"] = {
            "val": [str(va_paths[i]) for i in va_kept],
            "knn": (knn.argmax(1) == va_y).tolist(),
            "probe": (probe_scores.argmax(1) == va_y).tolist(),
            "recall@1": (tr_y[sim.argmax(1)] == va_y).tolist(),
        }
    return row


def fit_baseline(
    model: nn.Module, train: np.ndarray, *others: np.ndarray, fit: str, device: str = "cpu"
) -> tuple[Any, ...]:
    """``model`` (on ``device``) with ``whiten.fit_map(train, fit)`` applied, and the features
    ``train`` and ``others`` mapped as its output would be."""
    mapped = whiten.fit_map(torch.from_numpy(train), fit)
    apply = whiten.wrap(nn.Identity(), mapped)
    with torch.inference_mode():
        feats = [apply(torch.from_numpy(x)).numpy() for x in (train, *others)]
    return (whiten.wrap(model, {k: v.to(device) for k, v in mapped.items()}), *feats)


def split_fit(spec: str | os.PathLike) -> tuple[str, str]:
    """``"pixels+center"`` -> ("pixels", "center"): a baseline with the map of ``export --fit``
    fitted on its own train features; anything else -> (spec, "none")."""
    text = str(spec)
    base, plus, fit = text.rpartition("+")
    if plus and (base == "pixels" or base.startswith("random:")):
        if fit not in whiten.FITS:
            raise ValueError(f"Bad baseline {text!r}: +{fit}; valid: +center, +whiten")
        return base, fit
    return text, "none"


def shared_images(train_dir: str | os.PathLike, val_dir: str | os.PathLike) -> tuple[int, int]:
    """How many validation images are training images too (the same file), of how many: each
    one is its own nearest neighbour, so kNN and retrieval count it as found."""
    tr_paths, _, classes = image_folder(train_dir)
    va_paths, _, _ = image_folder(val_dir, classes=classes)
    return shared_files(va_paths, tr_paths), len(va_paths)


def check_spec(spec: str | os.PathLike) -> None:
    """Refuse a spec ``load_featurizer`` would refuse, before any row is measured (an eval of
    the encoder can take minutes, and a typo in the last baseline then threw them away)."""
    base, _ = split_fit(spec)
    if base == "pixels":
        return
    if base.startswith("random:"):
        parts = base.split(":")
        if len(parts) == 2 and Path(parts[1]).is_dir():
            base = parts[1]  # random_like: the directory must be an encoder
        elif len(parts) == 2 or (len(parts) == 3 and parts[2] == "small"):
            check_arch(parts[1])
            return
        else:
            raise ValueError(
                f"Bad baseline {base!r}; expected random:ARCH, random:ARCH:small or "
                "random:ENCODER_DIR"
            )
    if not (Path(base) / "config.json").is_file():
        raise ValueError(
            f"{str(spec)!r} is neither a baseline (pixels, random:ARCH[:small], "
            "random:ENCODER_DIR, each also with +center or +whiten) nor an encoder directory"
        )


def evaluate_many(
    specs: Sequence[str | os.PathLike],
    train_dir: str | os.PathLike,
    val_dir: str | os.PathLike,
    cfg: EvalConfig | None = None,
) -> list[dict[str, Any]]:
    """``evaluate`` for each encoder or baseline spec, one row each (same data, same settings).

    A baseline with a map that cannot be fitted (whitening wider features than there are
    training images for) is left out with a warning rather than failing the others."""
    rows = []
    for s in specs:
        try:
            rows.append(evaluate(s, train_dir, val_dir, cfg))
        except whiten.TooFewImages as e:
            log.warning("%s left out: %s", s, e)
    return rows


COLUMNS = (
    "encoder",
    "knn_top1",
    "probe_top1",
    "probe_top5",
    "mAP@10",
    "recall@1",
    "recall@5",
    "recall@10",
    "view_recall@1",
    "seconds",
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the main metrics (percent), one row per encoder."""
    cells = [
        [r["encoder"]]
        + [f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS[1:]]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(COLUMNS)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        )

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, cells)])


def write_json(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The rows as a JSON list (NaN written as null)."""

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and v != v else v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps([{k: clean(v) for k, v in r.items()} for r in rows], indent=2) + "\n"
    )
    return path
