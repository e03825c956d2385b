"""MoCo's augmentations as batched tensor operations, each sample with its own random parameters.

The PIL pipeline (``moco.augment``) augments one image at a time in DataLoader workers; on 2 CPU
cores at 32-64 px that costs as much as the model's step, and on a GPU it starves the device. Here
a whole uint8 batch is augmented at once on the training device: random resized crop and flip
(``crop_resize``: torch's antialiased uint8 resize per image on CPU, ``roi_align`` over the
batch elsewhere), colour jitter, grayscale and normalisation, then Gaussian blur (separable,
the same number of taps for every image; it commutes with the flip and the normalisation, so
they come first, where they cost least). The parameters are drawn as torchvision draws them
(RandomResizedCrop's ten attempts and central fallback, ColorJitter's factor ranges, the same
probabilities); the colour operations follow ``torchvision.transforms.functional``'s tensor
formulas. One difference: ColorJitter applies its four operations in a random order per image,
here in one random order per batch.

Images arrive padded into a square canvas with their true height and width (``ImageStore``), so
images of any aspect ratio share a batch and each crop is drawn inside its own image.

``fused=True`` runs each elementwise stage through ``torch.compile``, which fuses its tensor
passes into one loop (the hue rotation alone is about twenty passes in eager mode): on 2 CPU
cores two views cost 0.4x the eager ones at 64 px, 0.35x at 224 px, for 25-30 s of compiling
once per process (3 s when torch's inductor cache already holds the stages)
(docs/pretraining.md, "Speed"). The output is the eager one's up to float rounding (3e-6).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from moco.augment import IMAGENET_MEAN, IMAGENET_STD, _blur_kernel
from moco.compiling import quiet_cuda_extension_warning

log = logging.getLogger(__name__)

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def crop_boxes(
    sizes: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """RandomResizedCrop boxes (x1, y1, x2, y2) for images of ``sizes`` (N x 2: height, width).

    As torchvision: up to ten attempts of an area share in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; the first that fits is kept, else the largest central crop within
    ``ratio``.
    """
    n, device = sizes.shape[0], sizes.device
    h_img, w_img = sizes[:, 0].float(), sizes[:, 1].float()
    area = (h_img * w_img).unsqueeze(1)
    u = torch.rand(n, 10, 4, generator=generator, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * r))
    h = torch.round(torch.sqrt(target / r))
    ok = (w > 0) & (h > 0) & (w <= w_img.unsqueeze(1)) & (h <= h_img.unsqueeze(1))
    first = torch.where(
        ok.any(1), ok.float().argmax(1), torch.zeros_like(ok[:, 0], dtype=torch.long)
    )
    pick = first.view(n, 1)
    w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
    # torchvision: i = randint(0, H - h + 1), j = randint(0, W - w + 1)
    y = torch.floor(u[..., 2].gather(1, pick).squeeze(1) * (h_img - h + 1))
    x = torch.floor(u[..., 3].gather(1, pick).squeeze(1) * (w_img - w + 1))
    # the fallback: a central crop, clamped to the ratio range
    in_ratio = w_img / h_img
    fw = torch.where(
        in_ratio < ratio[0], w_img, torch.where(in_ratio > ratio[1], h_img * ratio[1], w_img)
    )
    fh = torch.where(
        in_ratio < ratio[0], w_img / ratio[0], torch.where(in_ratio > ratio[1], h_img, h_img)
    )
    fw, fh = torch.round(fw), torch.round(fh)
    fx, fy = torch.floor((w_img - fw) / 2), torch.floor((h_img - fh) / 2)
    found = ok.any(1)
    x, y = torch.where(found, x, fx), torch.where(found, y, fy)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    return torch.stack([x, y, x + w, y + h], dim=1)


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor
) -> torch.Tensor:
    """Each image's box (x1, y1, x2, y2) resized to ``size`` x ``size``, mirrored where ``flip``.

    On CPU, torch's antialiased bilinear resize of each uint8 box, as torchvision's
    ``resized_crop`` does it (to within one grey level: the channels-last uint8 kernel rounds
    its own way), one call per image: that kernel beats any batched float resampling we measured
    (``grid_sample`` on finer grids: 2x slower at 64 px, 4x at 224 px, with the float
    conversion). Off the CPU a loop of small calls would wait on the launches, so ``roi_align``
    does the whole batch (float out): each output pixel averages ``ceil(box side / size)``
    bilinear samples a side: the resize's values inside a box that is upscaled (at its edge it
    also weighs the pixels just outside), a box filter, not a triangle, where it is shrunk.
    Flipping here, before the colour and the blur, draws the same views as torchvision's flip
    after them: the colour operations are per pixel or over the whole image, and the blur's
    kernel and reflect padding are symmetric. On CPU the box is mirrored before it is resized:
    the same pixels (the resize's weights are symmetric), and the box is mostly the smaller copy.

    The CPU output is channels last, as the kernel writes it: each image is then one plain copy
    (into channels first it was a transposing copy per image: crop and ``to_unit`` took
    1.2-1.6x as long at 64 and 224 px); ``to_unit`` makes it channels first within its one pass.
    """
    if images.device.type != "cpu":
        x = _roi_align(images, boxes, size)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    out = torch.empty(len(boxes), size, size, images.shape[1], dtype=torch.uint8)
    out = out.permute(0, 3, 1, 2)
    for i, ((x1, y1, x2, y2), mirror) in enumerate(
        zip(boxes.long().tolist(), flip.tolist(), strict=True)
    ):
        box = images[i : i + 1, :, y1:y2, x1:x2]
        out[i : i + 1] = F.interpolate(
            box.flip(3) if mirror else box,
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    return out


def _roi_align(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype).view(-1, 1)
    rois = torch.cat([index, boxes], 1)
    return roi_align(
        images.float().contiguous(), rois, (size, size), 1.0, sampling_ratio=0, aligned=True
    )


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luma of an N x 3 x H x W batch in [0, 1]."""
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` (in turns, within [-0.5, 0.5]) per image.

    torchvision's RGB -> HSV -> RGB round trip, folded: with v = max, v s = max - min = c and
    6h = d / c + 2i (i the first channel holding the max, d the difference of the other two in
    HSV's order), each output channel is v - c clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6h + 6 factor) mod 6 for n = 5, 3, 1. A third of the round trip's tensor passes.
    Written for inductor: comparisons, not ``max``'s argmax (int64 index vectors), and the mod
    as ``t - 6 floor(t / 6)`` (``torch.remainder``'s own formula, which compiles to scalar code):
    a 224 px batch of 32 takes 6 ms fused, not 19. A zero factor returns ``x`` itself, not its
    round trip (which moves values by ~1e-7).
    """
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    r_max, g_max = r == v, g == v  # ties: the first channel, as torchvision's r, g, b order
    two_i = torch.where(r_max, 0.0, torch.where(g_max, 2.0, 4.0))
    d = torch.where(r_max, g - b, torch.where(g_max, b - r, r - g))
    h6 = d / torch.where(c > 0, c, 1.0) + two_i + 6.0 * factor.view(-1, 1, 1)

    def channel(n: float) -> torch.Tensor:
        t = n + h6
        k = t - 6.0 * torch.floor(t / 6.0)
        return v - c * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)

    out = torch.stack([channel(5.0), channel(3.0), channel(1.0)], 1)
    return torch.where(factor.view(-1, 1, 1, 1) == 0, x, out)  # ColorJitter's skipped images


BLUR_SIGMA = (0.1, 2.0)  # MoCo v2's GaussianBlur range (SimCLR's)

BLUR_TRUNCATE = 4.0
"""Taps beyond this many sigmas are dropped (scipy.ndimage's default): they hold under 2e-5 of
the kernel's weight, where torchvision's fixed 23 taps at 224 px are mostly zeros for small
sigmas."""


def blur_weights(kernel: int, sigma: torch.Tensor, sigma_max: float | None = None) -> torch.Tensor:
    """N x taps Gaussian weights, one row per ``sigma``, for torchvision's ``kernel`` size.

    Every row has the taps that ``sigma_max`` (else the largest sigma) needs, ``BLUR_TRUNCATE``
    sigmas each side, at most ``kernel``: 17 of torchvision's 23 at 224 px for sigmas up to 2.
    One tap count for every batch means one convolution, or one compiled loop, for them all."""
    top = float(sigma.max()) if sigma_max is None else sigma_max
    half = min(math.ceil(top * BLUR_TRUNCATE), kernel // 2)
    t = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)
    z = t.view(1, -1) / sigma.view(-1, 1)
    # each sigma's own truncation too: the weights past it underflow to denormal floats, which
    # slow every multiply by them on x86 (a 224 px batch of 32 blurred in 170 ms, not 28)
    k = torch.where(z.abs() <= BLUR_TRUNCATE, torch.exp(-0.5 * z**2), 0.0)
    return k / k.sum(1, keepdim=True)


def blur_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each image blurred by its row of ``k`` (N x taps) down and across, reflect padded, as two
    depthwise convolutions over the batch folded into channels (N*3 groups): one call each, and
    two kernel launches on a GPU. With ``blur_weights``, within 2e-5 of torchvision's
    ``gaussian_blur``."""
    n, c, h, w = x.shape
    taps = k.shape[1]
    k = k.repeat_interleave(c, 0)  # (N*C) x taps
    y = reflect_pad(x, taps).reshape(1, n * c, h + taps - 1, w + taps - 1)
    y = F.conv2d(y, k.view(n * c, 1, 1, taps), groups=n * c)
    return F.conv2d(y, k.view(n * c, 1, taps, 1), groups=n * c).view(n, c, h, w)


def reflect_pad(x: torch.Tensor, taps: int) -> torch.Tensor:
    pad = taps // 2
    return F.pad(x, (pad, pad, pad, pad), mode="reflect")


def shifted_sums(
    padded: torch.Tensor,
    k: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """``blur_conv``'s values from the padded images, as sums of shifted copies: slow in eager
    mode, but compiled it is one loop each way, 1.1-2x faster than the convolutions on 2 CPU
    cores from 32 to 224 px. (Padding inside the compiled loop computes a reflected index for
    every tap: 2x slower.) Written out as ``model_input`` says."""
    taps = k.shape[1]
    h, w = padded.shape[2] - taps + 1, padded.shape[3] - taps + 1
    k = k.view(*k.shape, 1, 1, 1)
    y = sum(k[:, i] * padded[:, :, :, i : i + w] for i in range(taps))
    return model_input(
        sum(k[:, i] * y[:, :, i : i + h, :] for i in range(taps)), dtype, channels_last
    )


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Resampled 0-255 values -> [0, 1], channels first (the colour stages compile to 2x
    faster loops over whole channel planes than over interleaved pixels)."""
    return (x.contiguous() / 255.0).clamp(0.0, 1.0)


def gray_where(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Grayscale (three equal channels) for the images where ``on``."""
    return torch.where(on.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)


def model_input(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """``x`` in the dtype and memory layout the model takes (``BatchAugment.dtype``)."""
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """(x - mean) / std, written out as ``model_input`` says."""
    return model_input((x - mean) / std, dtype, channels_last)


def gray_normalize(
    x: torch.Tensor,
    on: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """``gray_where`` then ``normalize``, in one pass.

    v2 blurs after this: normalising first changes nothing, since the blur is linear, its kernel
    sums to one and its padding reflects (up to float rounding)."""
    return normalize(gray_where(x, on), mean, std, dtype, channels_last)


class Fused:
    """``fn`` compiled by inductor on first use; ``fn`` itself if compiling fails (no C++
    compiler, an unsupported backend), with one warning: augmentation never stops a run."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.failed = fn, False
        self.compiled = torch.compile(fn)

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # any compiler fault: the eager function computes the same
                self.failed = True
                log.warning(
                    "augmentation runs unfused: compiling %s failed (%s)", self.fn.__name__, e
                )
        return self.fn(*args)


_FUSED: dict[Callable[..., torch.Tensor], Fused] = {}


def fused(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The process's one ``Fused`` of ``fn`` (each compiles once, whatever the augmenters)."""
    if fn not in _FUSED:
        if not _FUSED:  # the first batch waits for this: say why
            log.info("fused augmentation: compiling its stages (once per process, 3-30 s)")
            quiet_cuda_extension_warning()
        _FUSED[fn] = Fused(fn)
    return _FUSED[fn]


@dataclass(frozen=True)
class BatchAugment:
    """One MoCo view of each image of a uint8 batch: ``augment(images, sizes, generator)``.

    The same settings as ``moco.augment.moco_transform`` (version, crop_min, color, blur);
    ``crop_max`` below 1 makes the small local views of multi-crop; ``fused`` compiles the
    elementwise stages (see the module's docstring).

    ``dtype`` and ``channels_last``: the views as the model takes them, written by the last
    stage. Under bf16 autocast a channels-last model would otherwise copy each float32 view to
    channels last and cast it to bf16 in its first convolution, and that cast rounds as this one
    does: the same input, two passes fewer. End to end at 224 px, batch 32, fused on 2 CPU cores:
    0.94x of the compute-only step against 0.93x (docs/pretraining.md).
    """

    image_size: int
    version: str = "v2"
    crop_min: float = 0.2
    crop_max: float = 1.0
    color: float = 1.0
    blur: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    fused: bool = False
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.version not in ("v1", "v2"):
            raise ValueError(f"Unknown MoCo version {self.version!r}; valid: 'v1', 'v2'")
        if not 0.0 < self.crop_min <= self.crop_max <= 1.0 or self.color < 0:
            raise ValueError(
                "need 0 < crop_min <= crop_max <= 1 and color >= 0, got "
                f"{self.crop_min}, {self.crop_max}, {self.color}"
            )

    def __call__(
        self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """``images`` N x 3 x S x S uint8 (each in its top-left ``sizes`` corner) -> the views
        (``dtype``, channels last if ``channels_last``)."""
        n, dev, s = images.shape[0], images.device, self.image_size

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        op = fused if self.fused else _eager
        boxes = crop_boxes(sizes, (self.crop_min, self.crop_max), (3 / 4, 4 / 3), generator)
        x = op(to_unit)(crop_resize(images, boxes, s, rand(n) < 0.5))
        c = self.color
        v1 = self.version == "v1"
        strength = (0.4 * c, 0.4 * c, 0.4 * c, min((0.4 if v1 else 0.1) * c, 0.5))
        gray_p = min(0.2 * c, 1.0)
        mean = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        out = (self.dtype, self.channels_last)  # the last stage writes the views
        if v1:  # v1: grayscale, then jitter always (torchvision's v1 order)
            x = op(gray_where)(x, rand(n) < gray_p)
            every = torch.ones(n, dtype=torch.bool, device=dev)
            x = self._jitter(x, strength, every, rand, generator, op)
            return op(normalize)(x, mean, std, *out)
        x = self._jitter(x, strength, rand(n) < 0.8, rand, generator, op)
        x = op(gray_normalize)(x, rand(n) < gray_p, mean, std, *(() if self.blur else out))
        if self.blur:
            lo, hi = BLUR_SIGMA
            sigma = lo + (hi - lo) * rand(n)
            k = blur_weights(_blur_kernel(s), sigma, hi)
            # the others get the one-tap kernel, which leaves them exactly as they are: a batch
            # of fixed size compiles once, where the blurred images alone vary in number
            keep = torch.zeros_like(k)
            keep[:, k.shape[1] // 2] = 1.0
            k = torch.where((rand(n) < 0.5).view(-1, 1), k, keep)  # only those are blurred
            if self.fused:
                x = fused(shifted_sums)(reflect_pad(x, k.shape[1]), k, *out)
            else:
                x = model_input(blur_conv(x, k), *out)
        return x

    @staticmethod
    def _jitter(
        x: torch.Tensor,
        strength: tuple[float, float, float, float],
        on: torch.Tensor,
        rand: Callable[..., torch.Tensor],
        generator: torch.Generator,
        op: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]],
    ) -> torch.Tensor:
        """ColorJitter where ``on``: factors as torchvision draws them, one order per batch.

        The other images get the factors that change nothing (1, 1, 1 and a zero hue turn),
        which leave them exactly as they were: no pass to put them back."""
        n = x.shape[0]
        b, c, s, h = strength
        ops = []
        if b > 0:
            ops.append((adjust_brightness, 1.0 + b * (2 * rand(n) - 1) * on))
        if c > 0:
            ops.append((adjust_contrast, 1.0 + c * (2 * rand(n) - 1) * on))
        if s > 0:
            ops.append((adjust_saturation, 1.0 + s * (2 * rand(n) - 1) * on))
        if h > 0:
            ops.append((adjust_hue, h * (2 * rand(n) - 1) * on))
        order = torch.randperm(len(ops), generator=generator, device=x.device).tolist()
        for i in order:
            fn, factor = ops[i]
            x = op(fn)(x, factor)
        return x


def _eager(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return fn
