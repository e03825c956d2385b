"""``SplitBatchNorm``: per-GPU BatchNorm statistics emulated on one device.

MoCo's key encoder must not normalise a query's positive key with the same batch statistics
(the pretext task could then be solved by the batch "signature"); the official code shuffles
keys across GPUs, and on one device the official CIFAR demo splits the batch into groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm with statistics over ``num_splits`` consecutive groups of the batch.

    Emulates per-GPU BatchNorm on one device (official CIFAR demo). Its state dict is that of a
    plain ``BatchNorm2d``, so an exported encoder uses ordinary BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int, **kw: object) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if s == 1 or not self.training or x.shape[0] % s:
            return super().forward(x)
        if torch.is_grad_enabled():
            # Slicing along the batch keeps channels_last tensors dense (a reshape would copy).
            out = torch.cat(
                [
                    F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps)
                    for c in x.chunk(s)
                ]
            )
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
        else:  # the key encoder: one statistics pass and one fused multiply-add, in any layout
            n, c = x.shape[:2]
            groups = x.unflatten(0, (s, n // s))  # s x n/s x C x H x W, a view
            g_var, g_mean = torch.var_mean(
                groups.float(), dim=(1, 3, 4), keepdim=True, correction=0
            )
            scale = self.weight.view(1, 1, c, 1, 1) * torch.rsqrt(g_var + self.eps)
            shift = self.bias.view(1, 1, c, 1, 1) - g_mean * scale
            out = torch.addcmul(shift.to(x.dtype), groups, scale.to(x.dtype)).flatten(0, 1)
            # Whole-batch statistics from the groups' (law of total variance), unbiased.
            mean = g_mean.mean(0).view(c)
            var = (g_var.mean(0) + g_mean.var(0, correction=0)).view(c)
            var = var * (x.numel() / c) / max(x.numel() / c - 1, 1)
        with torch.no_grad():  # running stats from the whole batch, as plain BatchNorm keeps them
            # Under bf16 autocast x is bf16; the running buffers stay fp32 (lerp_ needs one dtype).
            # Through ``.data``: end-to-end runs this layer twice in one graph, and the first
            # (plain) pass saved the buffers for its backward, which reads only the batch's
            # statistics; an in-place update seen by autograd would fail that backward.
            self.running_mean.data.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.data.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return out


def split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """``module`` with each ``BatchNorm2d`` replaced, in place, by a ``SplitBatchNorm``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            bn = SplitBatchNorm(child.num_features, splits, eps=child.eps, momentum=child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            split_batchnorm(child, splits)
    return module


@contextmanager
def splitting(module: nn.Module, splits: int) -> Iterator[None]:
    """Within the block, every ``SplitBatchNorm`` of ``module`` uses ``splits`` groups.

    End-to-end training encodes queries and keys with one network: its queries normalise over
    the whole batch (1 group) and its keys over shuffled groups, as MoCo's two encoders do.
    """
    layers = [m for m in module.modules() if isinstance(m, SplitBatchNorm)]
    before = [m.num_splits for m in layers]
    for m in layers:
        m.num_splits = splits
    try:
        yield
    finally:
        for m, s in zip(layers, before, strict=True):
            m.num_splits = s
