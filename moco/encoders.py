"""Backbones by name, with the small-image stem used by MoCo's CIFAR demo.

The official CIFAR-10 demo of MoCo replaces ResNet's 7x7/2 conv + max-pool stem with a 3x3/1 conv
and no pool: on images of about 96 px and less the ImageNet stem throws away 4x of the resolution
before the first block. ``small_stem=True`` does the same here. The networks are torchvision's,
built by ``moco.resnet`` without importing torchvision (seconds of every command that embeds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco import resnet

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "wide_resnet50_2": resnet.wide_resnet50_2,
}
"""Randomly initialised backbones, torchvision's names and weights: nothing is downloaded."""

_FEATURE_DIM = {"resnet18": 512, "resnet34": 512}


def check_arch(arch: str) -> str:
    """Return ``arch`` or raise a ``ValueError`` naming the valid choices."""
    if arch not in ENCODERS:
        raise ValueError(f"Unknown arch {arch!r}; valid names: {', '.join(sorted(ENCODERS))}")
    return arch


def feature_dim(arch: str) -> int:
    """Width of the pooled features of ``arch`` (the input of its ``fc``)."""
    return _FEATURE_DIM.get(check_arch(arch), 2048)


def pooled_dim(arch: str, pooling: str = "avg") -> int:
    """Width of ``with_pooling(arch, pooling)``'s features: layer2-4 concatenated for "stages"
    (their channels are 1/4, 1/2 and all of layer4's)."""
    return feature_dim(arch) * 7 // 4 if pooling == "stages" else feature_dim(arch)


def default_pooling(arch: str) -> str:
    """``export``'s pooling: "stages" for 512-d backbones (ResNet-18/34), where it found the same
    emoji more often and gave a better probe on three sets (docs/pretraining.md); "avg" for
    wider ones, whose 3,584-d stages would cost 1.75x the index memory, and which were not
    measured."""
    return "stages" if feature_dim(arch) <= 512 else "avg"


def build_encoder(
    arch: str, num_classes: int = 0, small_stem: bool = False, *, empty: bool = False
) -> nn.Module:
    """A randomly initialised backbone; ``num_classes=0`` gives ``fc = Identity`` (features out).

    Args:
        arch: a key of ``ENCODERS``.
        num_classes: width of the final linear layer, or 0 for none.
        small_stem: 3x3 stride-1 first conv and no max-pool, for small images.
        empty: shapes only, on the ``meta`` device and not initialised, for weights loaded next
            with ``load_state_dict(..., assign=True)``: the random initialisation they replace
            took 0.26 s of every search by image with ResNet-18, 0.5 s with ResNet-50.
    """
    # empty draws no init at all: nn.init.normal_ on a meta tensor imports torch._dynamo (3 s)
    with torch.device("meta") if empty else contextlib.nullcontext():
        net = ENCODERS[check_arch(arch)](init=not empty)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
    return net


class GeM(nn.Module):
    """Generalised-mean pooling, ``(mean(x^p))^(1/p)`` over H x W (Radenovic et al. 2018).

    https://arxiv.org/abs/1711.02512. p=1 is average pooling and p -> inf max pooling; p=3, the
    paper's, weights a feature map's strongest responses (the object) over the background,
    which helps retrieval. Used for features only (``with_pooling``), never in training.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NxCxHxW -> NxCx1x1, like the AdaptiveAvgPool2d it replaces
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3), keepdim=True)
        return pooled.pow(1.0 / self.p)


class Stages(nn.Module):
    """A ResNet's pooled layer2, layer3 and layer4 outputs, each L2-normalised, concatenated.

    Earlier stages keep more of an image's layout and colour: on emoji searched across vendors
    they found the same emoji more often (+3.4 R@1 after 15 minutes; +5.5 with export's fitted
    map, which also removed their cost in kNN; docs/pretraining.md). Features only
    (``with_pooling(net, "stages")``, export's default for ResNet-18/34), never in training.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x)))))
        out = []
        for layer in (n.layer2, n.layer3, n.layer4):
            x = layer(x)
            out.append(F.normalize(x.mean(dim=(2, 3)), dim=1))
        return torch.cat(out, 1)


def with_pooling(net: nn.Module, pooling: str) -> nn.Module:
    """``net`` (a ``moco.resnet.ResNet``) with its global pooling set: "avg", "gem" (GeM p=3), or
    "stages" (a wrapper, ``Stages``)."""
    if pooling == "avg":
        net.avgpool = nn.AdaptiveAvgPool2d(1)
    elif pooling == "gem":
        net.avgpool = GeM()
    elif pooling == "stages":
        return Stages(net)
    else:
        raise ValueError(f"Unknown pooling {pooling!r}; valid: avg, gem, stages")
    return net
