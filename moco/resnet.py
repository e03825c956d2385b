"""ResNet (He et al. 2015, https://arxiv.org/abs/1512.03385), as torchvision builds it.

Why our own: ``import torchvision`` imports every model family and ``torchvision.ops``, which
imports ``torch._dynamo``: about 3 s of every process that embeds an image (a ``search`` from the
command line, ``index``, the web UI's start) for a network of a hundred lines. This one has
torchvision's module names (its state dicts, the demo encoder's and the official MoCo
checkpoints' load unchanged), its layers in the same order and its initialisation drawn in the
same order, so a seeded run builds the same weights, bit for bit (tests/moco/test_resnet.py
checks both against torchvision). Training still imports torchvision for its augmentations.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if base_width != 64:
            raise ValueError("BasicBlock only supports base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (the stride here, as torchvision's "ResNet v1.5"), 1x1 up (ResNet-50+)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet without dilation, groups or a custom norm layer (none used here)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        width_per_group: int = 64,
        init: bool = True,
    ) -> None:
        super().__init__()
        self.inplanes, self.base_width = 64, width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # torchvision's initialisation, in module order (the RNG draws follow it); skipped for
        # weights that are loaded next (``build_encoder(empty=True)``)
        for m in self.modules() if init else ():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # built before the block, as torchvision does: the RNG draws follow creation order
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [
            block(self.inplanes, planes, base_width=self.base_width) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(init: bool = True) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], init=init)


def resnet34(init: bool = True) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], init=init)


def resnet50(init: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], init=init)


def resnet101(init: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], init=init)


def resnet152(init: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], init=init)


def wide_resnet50_2(init: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=128, init=init)
