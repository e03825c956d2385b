"""kNN monitor during pretraining (official CIFAR demo: k=200, T=0.1 on the 128-d output).

The training images form the memory bank, labelled by their parent folder; ``--val-dir`` is an
ImageFolder tree of held-out images. Both are decoded once and kept as tensors, so each epoch
costs only forward passes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco.augment import eval_transform
from moco.data import ImageError, list_images, load_image
from moco.export import EncoderConfig
from moco.knn import knn_top1

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
    def __init__(self, cfg: Any, paths: list[Path], device: torch.device) -> None:
        root, val_root = Path(cfg.data), Path(cfg.val_dir)
        if len(paths) > MAX_BANK:
            g = torch.Generator().manual_seed(0)
            paths = [paths[i] for i in torch.randperm(len(paths), generator=g)[:MAX_BANK]]
        val_paths = list_images(val_root)
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
