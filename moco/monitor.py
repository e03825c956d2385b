"""Is training working? Two monitors, each measured on the untrained network first.

``ViewMonitor`` (always on, no labels): two fixed augmented views of held-out images; the share
of first views whose nearest second view (cosine, backbone features) is that of the same image.
Chance is 1/n; an untrained ResNet already scores well above it (its random features keep much
of an image's colour and layout), and that untrained figure, not chance, is the bar training
must clear: on emoji a short run of the old recipe fell below it (issue 11).

``KnnMonitor`` (``--val-dir``): kNN top-1 (official CIFAR demo: k=200, T=0.1 on the 128-d output)
of an ImageFolder tree of held-out images against the training images, labelled by their parent
folder. Both are decoded once and kept as tensors, so each epoch costs only forward passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco.config import TrainConfig
from moco.data import ImageError, list_images, load_image, shared_files
from moco.encoder_config import EncoderConfig
from moco.knn import knn_top1
from moco.preprocess import eval_transform

log = logging.getLogger(__name__)
MAX_BANK = 20_000


def _decode(paths: list[Path], image_size: int) -> tuple[torch.Tensor, list[int]]:
    # Only the preprocessing fields of the config matter here.
    tf = eval_transform(EncoderConfig(arch="resnet18", image_size=image_size, crop_pct=1.0))
    xs, keep = [], []
    for i, p in enumerate(paths):
        try:
            xs.append(tf(load_image(p, draft_size=image_size)))
            keep.append(i)
        except ImageError:
            continue
    return torch.stack(xs), keep


class KnnMonitor:
    def __init__(self, cfg: TrainConfig, paths: list[Path], device: torch.device) -> None:
        root, val_root = Path(cfg.data), Path(cfg.val_dir)
        val_paths = list_images(val_root)
        shared = shared_files(val_paths, paths)
        if val_paths and shared == len(val_paths):
            raise ValueError(
                f"every image of --val-dir {val_root} is also a training image of {root}: the "
                "kNN monitor would find each one itself; give --val-dir held-out images"
            )
        if shared:
            log.warning(
                "%d of the %d --val-dir images are training images too: the kNN monitor finds "
                "each of those itself",
                shared,
                len(val_paths),
            )
        if len(paths) > MAX_BANK:
            g = torch.Generator().manual_seed(0)
            paths = [paths[i] for i in torch.randperm(len(paths), generator=g)[:MAX_BANK]]
        classes = sorted(
            {p.relative_to(val_root).parts[0] for p in val_paths if p.parent != val_root}
        )
        if not classes:
            raise ValueError(
                f"--val-dir {val_root} must be an ImageFolder tree (one folder a class)"
            )
        index = {c: i for i, c in enumerate(classes)}
        bank_paths = [p for p in paths if p.parent.name in index]
        if not bank_paths:
            raise ValueError(
                f"no training image in {root} sits in a folder named like a --val-dir class "
                f"({', '.join(classes[:5])}...): the kNN monitor needs labelled training folders"
            )
        self.bank, keep = _decode(bank_paths, cfg.image_size)
        self.bank_labels = torch.tensor([index[bank_paths[i].parent.name] for i in keep])
        self.val, keep = _decode(val_paths, cfg.image_size)
        self.val_labels = torch.tensor(
            [index.get(val_paths[i].relative_to(val_root).parts[0], -1) for i in keep]
        )
        self.num_classes, self.k, self.t, self.device = len(classes), cfg.knn_k, cfg.knn_t, device
        log.info(
            "kNN monitor: %d bank images, %d val images, %d classes",
            len(self.bank),
            len(self.val),
            len(classes),
        )

    @torch.no_grad()
    def _features(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = [encoder(b.to(self.device)).float().cpu() for b in x.split(256)]
        return F.normalize(torch.cat(out), dim=1)

    def __call__(self, encoder: nn.Module) -> float:
        was_training = encoder.training
        encoder.eval()
        bank = self._features(encoder, self.bank)
        val = self._features(encoder, self.val)
        encoder.train(was_training)
        labels = (self.bank_labels, self.val_labels)
        return knn_top1(bank, labels[0], val, labels[1], self.num_classes, self.k, self.t)


@torch.no_grad()
def backbone_features(encoder: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised features of ``encoder`` without its head (what export and search use)."""
    head, encoder.fc = encoder.fc, nn.Identity()  # type: ignore[assignment]
    was_training = encoder.training
    encoder.eval()
    try:
        device = next(encoder.parameters()).device
        out = [encoder(b.to(device)).float().cpu() for b in x.split(batch)]
    finally:
        encoder.fc = head
        encoder.train(was_training)
    return F.normalize(torch.cat(out), dim=1)


class ViewMonitor:
    """Label-free: how often an augmented copy of a held-out image is its other copy's nearest.

    The views are drawn once, under a forked RNG (training's random stream is untouched), so
    the figure changes only with the weights.
    """

    def __init__(
        self, images: Sequence[Any], transform: Callable[[Any], torch.Tensor], seed: int = 0
    ) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a = torch.stack([transform(im) for im in images])
            self.b = torch.stack([transform(im) for im in images])

    def __len__(self) -> int:
        return len(self.a)

    def __call__(self, encoder: nn.Module) -> float:
        """Percentage of images whose first view finds its second view at rank 1."""
        sim = backbone_features(encoder, self.a) @ backbone_features(encoder, self.b).T  # nxn
        return 100.0 * (sim.argmax(1) == torch.arange(len(sim))).float().mean().item()


def verdict(
    trained: float, untrained: float, n: int, knn: tuple[float, float] | None, held_out: bool
) -> str:
    """The run's last line: did training beat the untrained network, and if not, what to try."""
    text = (
        f"finds augmented copies of {n} {'held-out' if held_out else 'training'} images "
        f"{trained:.1f}% of the time; "
        f"untrained {untrained:.1f}% (chance {100 / max(n, 1):.1f}%)"
    )
    if knn is not None:
        text += f"; kNN top-1 {knn[0]:.1f}%, untrained {knn[1]:.1f}%"
    beaten = trained > untrained + 1.0 and (knn is None or knn[0] > knn[1])
    if beaten:
        return f"training is working: {text}"
    return (
        f"training has NOT beaten the untrained network: {text}. Try a longer --minutes, the "
        "default recipe (leave --moco-k, --moco-m, --lr unset), a smaller --image-size on CPU, "
        "or more images"
    )
