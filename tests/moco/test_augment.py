"""moco.augment: view shapes of the v1/v2 recipes, the deterministic eval transform, two views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moco.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoCropsTransform,
    moco_transform,
)
from moco.export import EncoderConfig
from moco.preprocess import eval_transform


def _noise(w: int = 80, h: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("size", [32, 64])
def test_moco_transform_shapes(version: str, size: int) -> None:
    torch.manual_seed(0)
    x = moco_transform(size, version)(_noise())
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_moco_transform_unknown_version() -> None:
    with pytest.raises(ValueError, match=r"'v3'.*v1.*v2"):
        moco_transform(32, "v3")


def test_moco_transform_normalises() -> None:
    """Flat mid-grey through the recipe: flips, crops and blur leave it flat; values match
    (0.5 - mean) / std unless jitter or grayscale fired, so check the no-op transform path."""
    torch.manual_seed(0)
    t = moco_transform(16, "v2", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = t(Image.new("RGB", (20, 20), (128, 128, 128)))
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, x.flatten()[0].expand_as(x), atol=0.05)  # still flat


def test_eval_transform_deterministic_and_normalised() -> None:
    cfg = EncoderConfig(arch="resnet18", image_size=32, crop_pct=0.875)
    t = eval_transform(cfg)
    img = _noise(100, 70)
    a, b = t(img), t(img)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    flat = t(Image.new("RGB", (50, 50), (255, 255, 255)))
    expect = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.allclose(flat[:, 16, 16], expect, atol=1e-5)


def test_two_crops_gives_two_different_views() -> None:
    torch.manual_seed(0)
    two = TwoCropsTransform(moco_transform(32, "v2"))
    views = two(_noise(seed=1))
    assert isinstance(views, list) and len(views) == 2
    q, k = views
    assert q.shape == k.shape == (3, 32, 32)
    assert not torch.equal(q, k)


def test_two_crops_reproducible_under_seed() -> None:
    two = TwoCropsTransform(moco_transform(32, "v1"))
    img = _noise(seed=2)
    torch.manual_seed(5)
    first = two(img)
    torch.manual_seed(5)
    second = two(img)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_colour_strength_zero_and_full_crop_leave_a_flat_image_alone() -> None:
    flat = Image.new("RGB", (40, 40), (200, 30, 90))
    view = moco_transform(32, "v2", blur=False, crop_min=1.0, color=0.0)
    expected = eval_transform(EncoderConfig(arch="resnet18", image_size=32, crop_pct=1.0))(flat)
    for _ in range(5):
        assert torch.allclose(view(flat), expected, atol=1e-5)
    full = moco_transform(32, "v2", blur=False, crop_min=1.0, color=1.0)
    torch.manual_seed(0)
    assert any(not torch.allclose(full(flat), expected, atol=1e-3) for _ in range(10))


def test_crop_min_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="crop_min must be in"):
        moco_transform(32, crop_min=0.0)
