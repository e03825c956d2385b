"""Learning-rate schedules as pure functions of a (fractional) epoch.

v1 uses a step schedule (lr x0.1 at epochs 120 and 160 of 200), v2 a half-period cosine
(https://arxiv.org/abs/2003.04297, Table 1: "cos"). Both take fractional epochs, so the lr moves
every iteration, and an optional linear warm-up for large batches (Goyal et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def cosine_lr(base: float, epoch: float, epochs: int, warmup: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` epochs, then half a cosine from ``base`` to 0 at ``epochs``."""
    if epoch < warmup:
        return base * epoch / warmup
    progress = (epoch - warmup) / max(epochs - warmup, 1e-8)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def step_lr(base: float, epoch: float, milestones: Sequence[float], gamma: float = 0.1) -> float:
    """``base`` times ``gamma`` for each milestone already passed."""
    return base * gamma ** sum(epoch >= m for m in milestones)


def step_milestones(epochs: int) -> tuple[int, int]:
    """The v1 milestones, 120 and 160 of 200 epochs, scaled to ``epochs``."""
    return round(0.6 * epochs), round(0.8 * epochs)
