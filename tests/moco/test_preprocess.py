"""The inference preprocessing gives torchvision's pixels bit for bit: a collection indexed
before moco.preprocess replaced torchvision's transforms finds its images with the same vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from moco.encoder_config import EncoderConfig
from moco.preprocess import INTERPOLATIONS, eval_transform


def torchvisions(cfg: EncoderConfig) -> T.Compose:
    """What ``eval_transform`` was, before: torchvision's transforms on a PIL image."""
    return T.Compose(
        [
            T.Resize(round(cfg.image_size / cfg.crop_pct), T.InterpolationMode(cfg.interpolation)),
            T.CenterCrop(cfg.image_size),
            T.ToTensor(),
            T.Normalize(tuple(cfg.mean), tuple(cfg.std)),
        ]
    )


def noise(w: int, h: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# tall, wide, exact, one pixel wide, odd sides, smaller than the crop (padded), a long panorama
SIZES = [(97, 53), (53, 97), (64, 64), (1, 40), (33, 31), (20, 12), (640, 61)]


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
@pytest.mark.parametrize(("image_size", "crop_pct"), [(64, 0.875), (32, 1.0), (48, 1.3)])
def test_pixels_are_torchvisions(interpolation: str, image_size: int, crop_pct: float) -> None:
    cfg = EncoderConfig(
        arch="resnet18", image_size=image_size, crop_pct=crop_pct, interpolation=interpolation
    )
    ours, theirs = eval_transform(cfg), torchvisions(cfg)
    for seed, (w, h) in enumerate(SIZES):
        img = noise(w, h, seed)
        got, want = ours(img), theirs(img)
        assert got.shape == want.shape == (3, image_size, image_size)
        assert torch.equal(got, want), (w, h)


def test_an_image_that_is_not_rgb_is_read_as_rgb() -> None:
    cfg = EncoderConfig(arch="resnet18", image_size=32)
    gray = noise(40, 50, 0).convert("L")
    assert torch.equal(eval_transform(cfg)(gray), eval_transform(cfg)(gray.convert("RGB")))


def test_an_unknown_interpolation_names_the_valid_ones() -> None:
    cfg = EncoderConfig(arch="resnet18", image_size=32, interpolation="cubic")
    with pytest.raises(ValueError, match="Unknown interpolation 'cubic'; valid: nearest, "):
        eval_transform(cfg)
