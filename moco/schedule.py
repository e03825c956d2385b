"""Learning-rate and momentum schedules as pure functions of a (fractional) epoch.

v1 uses a step schedule (lr x0.1 at epochs 120 and 160 of 200), v2 a half-period cosine
(https://arxiv.org/abs/2003.04297, Table 1: "cos"). Both take fractional epochs, so the lr moves
every iteration, and an optional linear warm-up for large batches (Goyal et al. 2017).

The key encoder's momentum can rise from ``m`` to 1 on a cosine as in BYOL
(https://arxiv.org/abs/2006.07733, section 3.2) and MoCo v3 (https://arxiv.org/abs/2104.02057):
early keys follow the fast-changing query encoder closely, late keys barely move, which is what a
short run on little data needs (a fixed m=0.999 averages over 1,000 steps, a whole short run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def cosine_lr(base: float, epoch: float, epochs: float, warmup: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` epochs, then half a cosine from ``base`` to 0 at ``epochs``."""
    if epoch < warmup:
        return base * epoch / warmup
    progress = (epoch - warmup) / max(epochs - warmup, 1e-8)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def cosine_momentum(base: float, epoch: float, epochs: float) -> float:
    """Key-encoder momentum rising from ``base`` at epoch 0 to 1 at ``epochs`` on half a cosine.

    ``m = 1 - (1 - base) * (cos(pi * epoch / epochs) + 1) / 2``, as in BYOL and MoCo v3.
    """
    progress = min(max(epoch / max(epochs, 1e-8), 0.0), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_lr(base: float, epoch: float, milestones: Sequence[float], gamma: float = 0.1) -> float:
    """``base`` times ``gamma`` for each milestone already passed."""
    return base * gamma ** sum(epoch >= m for m in milestones)


def step_milestones(epochs: float) -> tuple[int, int]:
    """The v1 milestones, 120 and 160 of 200 epochs, scaled to ``epochs``."""
    return round(0.6 * epochs), round(0.8 * epochs)


def steps_in_budget(
    seconds_left: float, step_seconds: float, steps_per_epoch: int, epoch_overhead: float
) -> int:
    """How many more steps fit in ``seconds_left``, counting a fixed cost at every epoch's end.

    Each epoch ends with work that is not a step (the monitor, a checkpoint, new data-loading
    workers): ``epoch_overhead`` seconds per ``steps_per_epoch`` steps, and once more at the end.

    Examples:
        >>> steps_in_budget(100.0, step_seconds=1.0, steps_per_epoch=10, epoch_overhead=0.0)
        100
        >>> steps_in_budget(100.0, step_seconds=1.0, steps_per_epoch=10, epoch_overhead=10.0)
        45
    """
    per_step = step_seconds + epoch_overhead / max(steps_per_epoch, 1)
    return max(int((seconds_left - epoch_overhead) / max(per_step, 1e-9)), 0)


@dataclass
class Schedule:
    """Where the run is going: its length in steps and its warm-up (``--minutes`` may re-plan)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)  # the last one may be partial

    def lr(self, cfg: Any, step: int) -> float:
        frac, length = step / self.steps_per_epoch, self.total_steps / self.steps_per_epoch
        if cfg.version == "v1":
            return step_lr(cfg.base_lr, frac, step_milestones(length))
        return cosine_lr(cfg.base_lr, frac, length, self.warmup_steps / self.steps_per_epoch)

    def momentum(self, cfg: Any, step: int) -> float:
        """The key encoder's m at ``step``: "constant", "cosine" (to 1) or "fit" (see below).

        "fit" keeps m constant but at most ``1 - 10 / total_steps`` (and at least 0.9), so that
        the key encoder averages over no more than a tenth of the run: on emoji, 150 steps with
        m rising from 0.99 to 1 left the keys near the random network and the pretext accuracy
        fell from 60% to 0 (docs/pretraining.md, "Ablation").
        """
        m = cfg.moco_m if cfg.moco_m is not None else 0.999
        if cfg.m_schedule == "constant":
            return m
        if cfg.m_schedule == "fit":
            return min(m, max(0.9, 1.0 - 10.0 / max(self.total_steps, 1)))
        return cosine_momentum(m, step, self.total_steps)
