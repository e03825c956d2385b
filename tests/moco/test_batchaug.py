"""The batched augmentations against torchvision's, their random parameters, and the store."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF

from moco import batchaug as B
from moco.config import TrainConfig
from moco.imagestore import ImageStore
from moco.trainset import StoreBatches, batch_augment, loader, make_dataset
from tests.moco.conftest import fresh_compile_stderr


@pytest.fixture
def batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(6, 3, 20, 24)


@pytest.mark.parametrize(
    ("ours", "ref", "low", "high"),
    [
        (B.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (B.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (B.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        (B.adjust_hue, TF.adjust_hue, -0.1, 0.1),
    ],
)
def test_colour_ops_equal_torchvision_per_image(batch, ours, ref, low, high) -> None:
    factors = torch.linspace(low, high, batch.shape[0])
    got = ours(batch.clone(), factors)
    want = torch.stack([ref(im, float(f)) for im, f in zip(batch, factors, strict=True)])
    assert torch.allclose(got, want, atol=1e-5)


def test_hue_equals_torchvision_where_channels_tie() -> None:
    """Grey pixels, black, white and two channels sharing the max: torchvision's tie order."""
    torch.manual_seed(1)
    x = torch.randint(0, 3, (8, 3, 6, 6)).float() / 2  # values 0, 0.5, 1: many ties
    factors = torch.linspace(-0.5, 0.5, 8)
    want = torch.stack([TF.adjust_hue(im, float(f)) for im, f in zip(x, factors, strict=True)])
    assert torch.allclose(B.adjust_hue(x, factors), want, atol=1e-5)


def test_grayscale_equals_torchvision(batch) -> None:
    want = torch.stack([TF.rgb_to_grayscale(im) for im in batch])
    assert torch.allclose(B.grayscale(batch), want, atol=1e-6)


@pytest.mark.parametrize("kernel", [3, 7, 23])
def test_blur_equals_torchvision_with_each_images_sigma(batch, kernel: int) -> None:
    """23 taps (224 px): the images need 3 to 17 of them, blurred in groups by what they need."""
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.3])
    got = B.blur_conv(batch, B.blur_weights(kernel, sigmas))
    want = torch.stack(
        [
            TF.gaussian_blur(im, [kernel, kernel], [float(s)] * 2)
            for im, s in zip(batch, sigmas, strict=True)
        ]
    )
    assert torch.allclose(got, want, atol=2e-5)


def test_a_whole_image_crop_is_the_image_resized() -> None:
    """roi_align over the full box at the same size is the identity (pixel-centre aligned)."""
    from torchvision.ops import roi_align

    x = torch.rand(2, 3, 16, 16) * 255
    rois = torch.tensor([[0, 0, 0, 16, 16], [1, 0, 0, 16, 16]], dtype=torch.float)
    assert torch.allclose(
        roi_align(x, rois, (16, 16), sampling_ratio=0, aligned=True), x, atol=1e-3
    )


@pytest.mark.parametrize("out", [24, 12])
def test_cpu_crops_are_torchvisions_resized_crop_then_flip(out: int) -> None:
    """Boxes smaller and larger than the output (up to 3.3x), of images in a channels-last store
    (as ``ImageStore`` gathers them): each is ``resized_crop``, mirrored where asked."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 40, 40, 3), dtype=torch.uint8, generator=g)
    images = images.permute(0, 3, 1, 2)
    sizes = torch.randint(20, 41, (48, 2), generator=g)  # each in its canvas' top-left corner
    boxes = B.crop_boxes(sizes, (0.08, 1.0), (3 / 4, 4 / 3), g)
    side = torch.stack([boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1)
    assert (side < out).any() and (side > out).any()  # up- and downscaled
    flip = torch.rand(48, generator=g) < 0.5
    got = B.crop_resize(images, boxes, out, flip)
    cases = zip(images, boxes.long().tolist(), flip, got, strict=True)
    for im, (x1, y1, x2, y2), mirror, view in cases:
        want = TF.resized_crop(im, y1, x1, y2 - y1, x2 - x1, [out, out], antialias=True)
        want = (want.flip(2) if mirror else want).int()
        assert (view.int() - want).abs().max() <= 1  # torch's uint8 kernels round differently


def test_device_crops_are_roi_align_which_equals_a_bilinear_upscale() -> None:
    """Off the CPU the batch is cropped by ``roi_align`` (run here on CPU tensors): where a box
    is upscaled, that is torchvision's resize inside the box; at its edges roi_align also weighs
    the pixels just outside, where the resize repeats the edge."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8, generator=g)
    boxes = B.crop_boxes(torch.full((16, 2), 40), (0.1, 0.3), (3 / 4, 4 / 3), g)
    assert (boxes[:, 2:] - boxes[:, :2]).max() <= 24
    got = B._roi_align(images, boxes, 24)
    for im, (x1, y1, x2, y2), view in zip(images, boxes.long().tolist(), got, strict=True):
        want = TF.resized_crop(im.float(), y1, x1, y2 - y1, x2 - x1, [24, 24], antialias=True)
        assert (view - want)[:, 2:-2, 2:-2].abs().max() < 1e-3


def test_crop_boxes_follow_random_resized_crop() -> None:
    """Areas within the scale range, log-ratios spread over [log 3/4, log 4/3], inside the image."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[60, 80]] * 4000)
    boxes = B.crop_boxes(sizes, (0.2, 1.0), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 60).all()
    share = w * h / (60 * 80)
    assert share.min() >= 0.18 and share.max() <= 1.0
    # the same distribution as torchvision's (the first of ten attempts that fits)
    import torchvision.transforms as T

    torch.manual_seed(0)
    image = torch.zeros(3, 60, 80)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    )
    ref_share = ref[:, 2] * ref[:, 3] / (60 * 80)
    assert abs(float(share.mean() - ref_share.mean())) < 0.015
    assert abs(float(share.std() - ref_share.std())) < 0.015
    log_r = torch.log(w / h)
    assert log_r.min() > math.log(3 / 4) - 0.1 and log_r.max() < math.log(4 / 3) + 0.1
    ref_log_r = torch.log(ref[:, 3] / ref[:, 2].float())
    assert abs(float(log_r.mean() - ref_log_r.mean())) < 0.02
    # all crops differ: each sample has its own parameters
    assert len({tuple(b.tolist()) for b in boxes[:100]}) > 90


def test_crop_that_never_fits_falls_back_to_a_central_crop() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = B.crop_boxes(torch.tensor([[10, 100]]), (0.9, 1.0), (3 / 4, 4 / 3), g)
    assert boxes[0].tolist() == [43.0, 0.0, 56.0, 10.0]  # 10 px high, at most 4/3 wide: 13 px


def test_jitter_and_grayscale_happen_as_often_as_the_recipe_says() -> None:
    """v2: jitter with p=0.8, grayscale 0.2 (seen as images with equal channels)."""
    aug = B.BatchAugment(16, blur=False)
    imgs = torch.zeros(2000, 3, 16, 16, dtype=torch.uint8)
    imgs[:, 0], imgs[:, 1], imgs[:, 2] = 200, 100, 50
    out = aug(imgs, torch.tensor([[16, 16]] * 2000), torch.Generator().manual_seed(1))
    x = out * torch.tensor(aug.std).view(1, 3, 1, 1) + torch.tensor(aug.mean).view(1, 3, 1, 1)
    gray = (x.amax(1) - x.amin(1)).amax((1, 2)) < 1e-4
    assert 0.17 < gray.float().mean() < 0.23
    unchanged = (x[:, 0] - 200 / 255).abs().amax((1, 2)) < 1e-4
    assert 0.15 < (unchanged & ~gray).float().mean() < 0.25  # no jitter, no grayscale: 0.2*0.8


@pytest.mark.parametrize("fused", [False, True])
def test_half_the_views_are_blurred_and_the_rest_left_exactly_alone(fused: bool) -> None:
    """A sharp edge, no colour change, the whole image: a view either keeps the edge bit for
    bit or softens it, as often as p=0.5 and sigmas 0.1-2 allow (a blur of sigma under ~0.17
    moves no float32 value)."""
    aug = B.BatchAugment(16, color=0.0, crop_min=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    aug = B.BatchAugment(**{**aug.__dict__, "fused": fused})
    imgs = torch.zeros(1000, 3, 16, 16, dtype=torch.uint8)
    imgs[:, :, 8:] = 255  # dark top, light bottom: the same mirrored
    out = aug(imgs, torch.tensor([[16, 16]] * 1000), torch.Generator().manual_seed(2))
    sharp = (out == imgs.float() / 255).flatten(1).all(1)
    assert 0.5 < sharp.float().mean() < 0.58
    soft = out[~sharp][:, :, 7:9].flatten(1)  # the rows either side of the edge
    assert ((soft > 0) & (soft < 1)).any(1).all()  # the others are blurred, not broken


def test_two_views_of_one_batch_differ_and_a_seed_repeats_them() -> None:
    aug = B.BatchAugment(16)
    imgs = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    sizes = torch.tensor([[32, 32]] * 8)
    g = torch.Generator().manual_seed(3)
    a, b = aug(imgs, sizes, g), aug(imgs, sizes, g)
    assert a.shape == (8, 3, 16, 16) and not torch.allclose(a, b)
    assert torch.equal(a, aug(imgs, sizes, torch.Generator().manual_seed(3)))


def test_a_resumed_epoch_draws_the_same_batches(emoji_dir: Path, tmp_path: Path) -> None:
    """Batch b's augmentations depend only on (seed, b): resuming at batch 2 repeats 2, 3, ..."""
    from moco.data import list_images

    cfg = TrainConfig(data=str(emoji_dir), out=str(tmp_path), image_size=16, batch_size=4)
    paths = list_images(emoji_dir)[:16]
    store = make_dataset(cfg, paths)
    assert isinstance(store, ImageStore)
    full = list(loader(store, list(range(16)), cfg, world=1, epoch=0))
    resumed = list(loader(store, list(range(8, 16)), cfg, world=1, epoch=0, first_batch=2))
    assert len(full) == 4 and len(resumed) == 2
    for (va, ia, _), (vb, ib, _) in zip(full[2:], resumed, strict=True):
        assert torch.equal(ia, ib) and torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])
    assert not torch.equal(full[0][0][0], full[1][0][0])


def test_ranks_draw_different_augmentations_of_the_same_images(
    emoji_dir: Path, tmp_path: Path
) -> None:
    from moco.data import list_images

    cfg = TrainConfig(data=str(emoji_dir), out=str(tmp_path), image_size=16, batch_size=8)
    store = make_dataset(cfg, list_images(emoji_dir)[:8])
    idx = list(range(4))  # the same images on both ranks, to compare their views
    ((v0, i0, _),) = loader(store, idx, cfg, world=2, epoch=0, rank=0)
    ((v1, i1, _),) = loader(store, idx, cfg, world=2, epoch=0, rank=1)
    assert torch.equal(i0, i1)
    assert not torch.equal(v0[0], v1[0]) and not torch.equal(v0[1], v1[1])
    ((again, _, _),) = loader(store, idx, cfg, world=2, epoch=0, rank=1)
    assert torch.equal(again[0], v1[0])


def test_pil_path_is_kept_for_augment_pil(emoji_dir: Path, tmp_path: Path) -> None:
    from moco.data import list_images

    cfg = TrainConfig(
        data=str(emoji_dir), out=str(tmp_path), image_size=16, batch_size=2, augment="pil"
    )
    ds = make_dataset(cfg, list_images(emoji_dir)[:4])
    assert not isinstance(ds, ImageStore)
    assert not isinstance(loader(ds, [0, 1], cfg, world=1, epoch=0), StoreBatches)


def test_local_views_crop_small_areas_at_their_own_size(emoji_dir: Path, tmp_path: Path) -> None:
    """--local-crops: L more views per batch at --local-size, from crops of 0.05 to crop_min of
    the image (SwAV's split), after the two global views, which stay as without multi-crop."""
    from moco.data import list_images

    common = dict(data=str(emoji_dir), out=str(tmp_path), image_size=16, batch_size=4)
    cfg = TrainConfig(**common, local_crops=3, local_size=8)
    paths = list_images(emoji_dir)[:8]
    store = make_dataset(cfg, paths)
    views, _, _ = next(iter(loader(store, list(range(8)), cfg, world=1, epoch=0)))
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert not torch.equal(views[2], views[3])
    plain = TrainConfig(**common)
    same, _, _ = next(iter(loader(store, list(range(8)), plain, world=1, epoch=0)))
    assert torch.equal(same[0], views[0]) and torch.equal(same[1], views[1])
    local = batch_augment(cfg, local=True)
    assert (local.image_size, local.crop_min, local.crop_max) == (8, 0.05, 0.2)
    assert batch_augment(TrainConfig(**common, local_crops=2), local=True).image_size == 8
    sizes = torch.tensor([[64, 64]] * 2000)
    boxes = B.crop_boxes(sizes, (local.crop_min, local.crop_max), (3 / 4, 4 / 3), torch.Generator())
    share = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 64**2
    assert share.min() > 0.04 and share.max() < 0.22 and 0.11 < share.mean() < 0.14


def test_local_crops_need_the_batched_augmentation_and_moco(tmp_path: Path) -> None:
    from moco.recipe import check_config

    for bad in (dict(augment="pil"), dict(mechanism="end-to-end")):
        cfg = TrainConfig(data="d", out=str(tmp_path), batch_size=4, local_crops=2, **bad)
        with pytest.raises(ValueError, match="--local-crops needs"):
            check_config(cfg, num_images=100)


def test_auto_augments_where_it_measured_faster(tmp_path: Path) -> None:
    """Batched on a GPU and for small images on CPU; PIL workers for large images on CPU."""
    from moco.trainset import batched

    def cfg(**kw: object) -> TrainConfig:
        return TrainConfig(data=str(tmp_path), out=str(tmp_path), **kw)

    assert batched(cfg(image_size=32), "cpu") and batched(cfg(image_size=96), "cpu")
    assert not batched(cfg(image_size=224), "cpu") and batched(cfg(image_size=224), "cuda")
    assert batched(cfg(image_size=224, amp=True), "cpu")  # a bf16 step: workers would compete
    assert batched(cfg(image_size=224, local_crops=2), "cpu")  # multi-crop is batched only
    assert batched(cfg(image_size=224, augment="batch"), "cpu")
    assert not batched(cfg(image_size=32, augment="pil"), "cuda")


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_fused_views_equal_the_eager_ones(version: str) -> None:
    """Compiling fuses the passes; the views are the same draws, equal up to float rounding."""
    imgs = (torch.rand(8, 3, 24, 24) * 255).to(torch.uint8)
    sizes = torch.tensor([[24, 20]] * 8)
    eager = B.BatchAugment(16, version)(imgs, sizes, torch.Generator().manual_seed(5))
    fused = B.BatchAugment(16, version, fused=True)
    got = fused(imgs, sizes, torch.Generator().manual_seed(5))
    assert torch.allclose(got, eager, atol=1e-5)
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler here: the fused stages ran eager (the fallback)")
    assert not B.fused(B.adjust_hue).failed  # compiled, not fallen back


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kw", [{}, {"blur": False}, {"version": "v1"}])
def test_views_come_in_the_dtype_and_layout_the_model_takes(kw: dict, fused: bool) -> None:
    """bf16 channels-last views, written by whichever stage comes last, are the float32 views
    rounded as autocast's cast rounds them."""
    imgs = (torch.rand(8, 3, 24, 24) * 255).to(torch.uint8)
    sizes = torch.tensor([[24, 20]] * 8)
    plain = B.BatchAugment(16, fused=fused, **kw)(imgs, sizes, torch.Generator().manual_seed(5))
    aug = B.BatchAugment(16, fused=fused, dtype=torch.bfloat16, channels_last=True, **kw)
    got = aug(imgs, sizes, torch.Generator().manual_seed(5))
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert not got.is_contiguous()
    assert torch.equal(got, plain.to(torch.bfloat16))


def test_a_run_draws_its_views_as_its_model_takes_them(tmp_path: Path) -> None:
    common = dict(data="d", out=str(tmp_path), image_size=16, batch_size=4)
    amp = batch_augment(TrainConfig(**common, amp=True, local_crops=2), local=True)
    assert (amp.dtype, amp.channels_last) == (torch.bfloat16, True)
    fp32 = batch_augment(TrainConfig(**common, amp=False, channels_last=False))
    assert (fp32.dtype, fp32.channels_last) == (torch.float32, False)


def test_fused_falls_back_to_eager_when_compiling_fails(caplog) -> None:
    """No working C++ compiler: the same values, from the eager function, and one warning."""
    import torch._inductor.config as inductor

    x = torch.rand(4, 3, 8, 8) * 255
    op = B.Fused(B.to_unit)
    with inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        first, second = op(x), op(x)
    assert op.failed and torch.equal(first, B.to_unit(x)) and torch.equal(second, first)
    assert [r.message for r in caplog.records if "unfused" in r.message][:1]


@pytest.mark.parametrize(
    ("device", "minutes", "epochs", "want"),
    [
        ("cpu", 15, 0, True),
        ("cpu", 2, 0, False),
        ("cpu", 0, 100, True),
        ("cpu", 0, 10, False),
        ("cuda", 15, 0, False),
    ],
)
def test_long_cpu_runs_fuse_their_augmentation(device, minutes, epochs, want) -> None:
    """Compiling costs seconds once: CPU runs of 5 minutes or 2,000 steps repay it."""
    from moco.trainset import fuse_augment

    cfg = TrainConfig(data="d", out="o", minutes=minutes, epochs=epochs or 1)
    assert fuse_augment(cfg, 50, torch.device(device)) is want


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about a missing CUDA")
def test_compiling_on_cpu_does_not_warn_about_cuda() -> None:
    """A fresh process, since torch warns once, when inductor first imports cpp_extension."""
    code = (
        "import torch; from moco import batchaug as B\n"
        "x = torch.rand(2, 3, 8, 8); f = torch.tensor([True, False]).view(2, 1, 1, 1)\n"
        "m, s = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)\n"
        "assert not B.fused(B.gray_normalize)(x, f, m, s).isnan().any()\n"
        "assert not B.fused(B.gray_normalize).failed"
    )
    assert "No CUDA runtime" not in fresh_compile_stderr(code)
