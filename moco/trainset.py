"""What a pretraining run trains on: the images (decoded once into memory), their two views,
and the held-out images of the label-free monitor."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from moco.augment import TwoCropsTransform, moco_transform
from moco.data import ImageError, ImageFiles, load_image
from moco.monitor import ViewMonitor

log = logging.getLogger(__name__)


def cache_images(paths: list[Path], size: int) -> list[Any]:
    """Decode every image once, downscaled to about ``size`` px: augmentations then cost no
    decoding, which otherwise starves the model on small images."""
    out: list[Any] = []
    for p in paths:
        try:
            im = load_image(p, draft_size=size)
            if min(im.size) > size:
                im.thumbnail((size * im.width // min(im.size), size * im.height // min(im.size)))
            out.append(im)
        except ImageError as e:
            log.warning("skipping %s: %s", p, e)
            out.append(None)
    return out


class CachedImages(ImageFiles):
    def __init__(self, images: list[Any], transform: Any) -> None:
        super().__init__([Path()] * len(images), transform)
        self.images = images

    def __getitem__(self, i: int) -> tuple[Any, int]:
        im = self.images[i]
        return (None if im is None else self.transform(im)), i


def view_transform(cfg: Any) -> Any:
    """The augmentation of one view, as ``cfg`` sets it."""
    return moco_transform(
        cfg.image_size,
        cfg.version,
        blur=cfg.blur,
        crop_min=cfg.crop_min if cfg.crop_min is not None else 0.2,
        color=cfg.color if cfg.color is not None else 1.0,
    )


def make_dataset(cfg: Any, paths: list[Path]) -> ImageFiles:
    transform = TwoCropsTransform(view_transform(cfg))
    use_cache = cfg.cache == "on" or (
        cfg.cache == "auto" and len(paths) * (2 * cfg.image_size) ** 2 * 3 < 2 * 2**30
    )
    if use_cache:
        t0 = time.perf_counter()
        images = cache_images(paths, 2 * cfg.image_size)
        log.info("decoded %d images into memory in %.1fs", len(images), time.perf_counter() - t0)
        return CachedImages(images, transform)
    return ImageFiles(paths, transform)


def holdout(paths: list[Path], cfg: Any) -> tuple[list[Path], list[Path], bool]:
    """Training paths, the label-free monitor's images, and whether those are held out.

    Folders of 500 images or more give up to ``monitor_images`` (at most a tenth) to the
    monitor; smaller ones are too precious, and the monitor samples training images instead.
    """
    n = min(cfg.monitor_images, len(paths) // 10)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    order = torch.randperm(len(paths), generator=g).tolist()
    if cfg.monitor_images <= 0:
        return paths, [], False
    if len(paths) < 500:
        chosen = sorted(order[: min(cfg.monitor_images, len(paths))])
        return paths, [paths[i] for i in chosen], False
    held = set(order[:n])
    train_paths = [p for i, p in enumerate(paths) if i not in held]
    return train_paths, [paths[i] for i in sorted(held)], True


def view_monitor(cfg: Any, paths: list[Path]) -> ViewMonitor | None:
    images = [im for im in cache_images(paths, 2 * (cfg.image_size or 64)) if im is not None]
    return ViewMonitor(images, view_transform(cfg), seed=cfg.seed) if len(images) >= 2 else None
