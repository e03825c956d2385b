"""Augmentations of MoCo v1 and v2 (training only: the evaluation transform is
``moco.preprocess``, which embeds without importing torchvision).

v1 (https://arxiv.org/abs/1911.05722): random resized crop, colour jitter, grayscale, flip.
v2 (https://arxiv.org/abs/2003.04297) "aug+": adds Gaussian blur and applies jitter with p=0.8;
with the MLP head and cosine schedule it is what lifts v1's 60.6% to v2's 67.5% (200 epochs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from moco.encoder_config import IMAGENET_MEAN, IMAGENET_STD


class TwoCropsTransform:
    """Two independently augmented views of one image: the query and its positive key."""

    def __init__(self, base: Callable[[Image.Image], Any]) -> None:
        self.base = base

    def __call__(self, img: Image.Image) -> list[Any]:
        return [self.base(img), self.base(img)]


def _blur_kernel(image_size: int) -> int:
    k = max(3, int(0.1 * image_size))  # SimCLR: about 10% of the image side, odd
    return k if k % 2 else k + 1


def moco_transform(
    image_size: int,
    version: str = "v2",
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    blur: bool = True,
    crop_min: float = 0.2,
    color: float = 1.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """The augmentation of one view for MoCo ``version`` "v1" or "v2".

    Args:
        crop_min: smallest crop, as a share of the image area (the papers' 0.2). A 0.2 crop of
            a 64 px image is a 29 px patch upscaled: small images lose their object to it.
        color: strength of the colour jitter and the grayscale probability, 1 = the papers'.
            Colour is much of what tells two small images apart (and what stays the same
            when another vendor draws the same emoji); full-strength jitter teaches the
            encoder to ignore it.
    """
    if not 0.0 < crop_min <= 1.0 or color < 0:
        raise ValueError(f"crop_min must be in (0, 1] and color >= 0, got {crop_min}, {color}")
    crop = T.RandomResizedCrop(
        image_size, scale=(crop_min, 1.0), interpolation=InterpolationMode.BILINEAR
    )
    tail = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    if version == "v1":
        jitter = T.ColorJitter(0.4 * color, 0.4 * color, 0.4 * color, min(0.4 * color, 0.5))
        return T.Compose([crop, T.RandomGrayscale(p=min(0.2 * color, 1.0)), jitter, *tail])
    if version != "v2":
        raise ValueError(f"Unknown MoCo version {version!r}; valid: 'v1', 'v2'")
    ops: list[Any] = [
        crop,
        T.RandomApply(
            [T.ColorJitter(0.4 * color, 0.4 * color, 0.4 * color, min(0.1 * color, 0.5))], p=0.8
        ),
        T.RandomGrayscale(p=min(0.2 * color, 1.0)),
    ]
    if blur:
        ops.append(T.RandomApply([T.GaussianBlur(_blur_kernel(image_size), (0.1, 2.0))], p=0.5))
    return T.Compose(ops + tail)
