"""An encoder's inference preprocessing: resize, centre crop, normalise (timm's ``crop_pct``).

The same pixels as torchvision's ``Compose([Resize, CenterCrop, ToTensor, Normalize])`` on a PIL
image, bit for bit (tests/moco/test_preprocess.py compares them), without importing torchvision:
that import costs every process that embeds an image about 3 s (see ``moco.resnet``), and the
collections indexed so far must get the same vectors for the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
"""An encoder config's ``interpolation`` -> PIL's filter, as torchvision maps its modes."""


class Preprocessing(Protocol):
    """What the preprocessing reads from an ``EncoderConfig`` (or any object with these)."""

    image_size: int
    interpolation: str
    crop_pct: float
    mean: tuple[float, ...] | list[float]
    std: tuple[float, ...] | list[float]


def resize_side(pre: Preprocessing) -> int:
    """The short side an image is resized to before its centre crop of ``image_size``."""
    return round(pre.image_size / pre.crop_pct)


def resample(interpolation: str) -> Image.Resampling:
    """PIL's filter for an ``interpolation`` name, or a ``ValueError`` naming the valid ones."""
    if interpolation not in INTERPOLATIONS:
        valid = ", ".join(INTERPOLATIONS)
        raise ValueError(f"Unknown interpolation {interpolation!r}; valid: {valid}")
    return INTERPOLATIONS[interpolation]


def resize_short(img: Image.Image, side: int, filt: Image.Resampling) -> Image.Image:
    """The short side to ``side``, the long one in proportion (rounded down, as torchvision)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(side * long / short)
    size = (side, new_long) if w <= h else (new_long, side)
    return img if size == (w, h) else img.resize(size, filt)


def center_crop(img: Image.Image, side: int) -> Image.Image:
    """The centre ``side`` x ``side``; an image smaller than that is padded with black first
    (torchvision pads ``(d // 2, (d + 1) // 2)``, then crops at the rounded centre)."""
    w, h = img.size
    if side > w or side > h:
        pw, ph = max(side - w, 0), max(side - h, 0)
        padded = Image.new(img.mode, (w + pw, h + ph))
        padded.paste(img, (pw // 2, ph // 2))
        img, (w, h) = padded, padded.size
    top, left = round((h - side) / 2.0), round((w - side) / 2.0)  # half to even, as torchvision
    return img if (w, h) == (side, side) else img.crop((left, top, left + side, top + side))


def to_tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """3 x H x W float32 in [0, 1], normalised, as ``ToTensor`` then ``Normalize``."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    x = torch.from_numpy(np.array(rgb, np.uint8, copy=True)).permute(2, 0, 1)
    return x.contiguous().to(torch.float32).div(255).sub_(mean).div_(std)


def eval_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Resize, centre-crop and normalise as the encoder's config says: PIL image -> 3 x S x S."""
    side, crop, filt = resize_side(pre), pre.image_size, resample(pre.interpolation)
    mean = torch.as_tensor(tuple(pre.mean), dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(tuple(pre.std), dtype=torch.float32)[:, None, None]

    def transform(img: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop(resize_short(img, side, filt), crop), mean, std)

    return transform
