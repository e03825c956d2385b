"""One epoch of MoCo training over a typed ``TrainState``, and the ``--minutes`` re-planning.

``train_one_epoch`` is the loop of the official ``main_moco.py`` (set lr, step, log) plus what a
user's run needs: the momentum schedule, bf16 autocast, a divergence check, a progress bar and
the wall-clock budget. The state it advances (``epoch``, ``step``) is what a Ctrl-C saves, so an
interrupted step needs no side channel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from moco.config import TrainConfig
from moco.distributed import world_size
from moco.loss import topk_accuracy
from moco.mechanisms import Model
from moco.model import MoCo
from moco.recipe import Budget, warmup_epochs
from moco.schedule import Schedule
from moco.trainlog import RunLog
from moco.trainset import batches

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; continuing would only write garbage checkpoints."""


@dataclass
class TrainState:
    """Everything one epoch of training reads and advances.

    ``epoch`` and ``step`` (within the epoch) say where the run is: after a finished epoch
    ``step`` is 0 and ``in_epoch`` False, so an interruption between epochs resumes at the next.
    """

    step_fn: nn.Module  # the model as called: DDP-wrapped when distributed
    model: Model  # MoCo, EndToEnd or MemoryBank (--mechanism)
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    amp: bool
    runlog: RunLog
    schedule: Schedule
    budget: Budget | None
    epoch: int = 0
    step: int = 0
    in_epoch: bool = False

    def steps_this_epoch(self) -> int:
        sched = self.schedule
        return min(sched.steps_per_epoch, sched.total_steps - self.epoch * sched.steps_per_epoch)


def plan(state: TrainState, done: int) -> None:
    """Fit the schedule to the time left, from the pace measured so far; log what was chosen.

    The warm-up is set once, at the first plan; later plans only move the cosine's end.
    """
    assert state.budget is not None
    sched, cfg, first = state.schedule, state.cfg, not state.budget.planned
    before = sched.total_steps
    sched.total_steps = max(state.budget.plan(done, sched.steps_per_epoch), done + 1)
    if first:
        epochs = warmup_epochs(cfg.warmup_epochs, sched.total_steps, sched.steps_per_epoch)
        sched.warmup_steps = round(epochs * sched.steps_per_epoch)
    state.cfg = state.runlog.cfg = dataclasses.replace(
        cfg, epochs=sched.epochs, total_steps=sched.total_steps
    )
    if state.runlog.enabled:
        config = json.dumps(dataclasses.asdict(state.cfg), indent=2)
        (Path(cfg.out) / "config.json").write_text(config + "\n")
    if not first and abs(sched.total_steps - before) < 0.05 * before:
        return
    step_s = state.budget.step_seconds()
    log.info(
        "--minutes %g: %.2f s a step (%.0f img/s) after %d steps; %s %d steps = %.2f epochs "
        "of %d steps (warm-up %d, then cosine to 0; m %s)",
        cfg.minutes,
        step_s,
        (cfg.batch_size or 0) / step_s,
        done,
        "chose" if first else "pace changed: re-planned to",
        sched.total_steps,
        sched.total_steps / sched.steps_per_epoch,
        sched.steps_per_epoch,
        sched.warmup_steps,
        f"{sched.momentum(cfg, done):.4g}, {cfg.m_schedule}",
    )


def train_one_epoch(state: TrainState, loader: DataLoader) -> dict[str, float]:
    """Train ``state.epoch`` from ``state.step``; return the epoch's mean loss, accuracy, pace."""
    model, optimizer, device, sched, budget = (
        state.model,
        state.optimizer,
        state.device,
        state.schedule,
        state.budget,
    )
    model.train()
    fmt = torch.channels_last if state.cfg.channels_last else torch.contiguous_format
    loss_sum, acc_sum, n_seen, n_steps = 0.0, 0.0, 0, 0
    lr = float("nan")
    t0 = time.perf_counter()
    bar = state.runlog.progress(state.epoch, total=state.steps_this_epoch(), initial=state.step)
    state.in_epoch = True
    try:
        for views, ids in batches(loader, state.runlog, device):
            if state.step >= state.steps_this_epoch() or (budget is not None and budget.expired()):
                break
            cfg = state.cfg
            global_step = state.epoch * sched.steps_per_epoch + state.step
            lr = sched.lr(cfg, global_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if isinstance(model, MoCo):  # the other mechanisms have no key encoder
                model.m = sched.momentum(cfg, global_step)
            im_q, im_k, *local = (v.to(device, non_blocking=True, memory_format=fmt) for v in views)
            ids = ids.to(device, non_blocking=True)
            extra = (torch.cat(local),) if local else ()  # multi-crop: all local views at once
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=state.amp):
                loss, logits, labels = state.step_fn(im_q, im_k, ids, *extra)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {state.epoch + 1} step {state.step}; "
                    f"lower --lr (now {cfg.base_lr:.4g}) or --moco-t, or check the images"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = im_q.shape[0]
            acc = topk_accuracy(logits, labels)[0]
            loss_sum += loss.item() * n
            acc_sum += acc * n
            n_seen += n
            n_steps += 1
            state.step += 1
            if budget is not None:
                budget.tick(first_in_epoch=n_steps == 1)
                if budget.due(global_step + 1):
                    plan(state, global_step + 1)
                    bar.total = state.steps_this_epoch()
                    bar.set_description(state.runlog.epoch_label(state.epoch), refresh=False)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                acc=f"{acc:.0f}",
                img_s=f"{n_seen / (time.perf_counter() - t0):.0f}",
            )
            state.runlog.step(global_step + 1, loss.item(), lr)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    momentum = {"momentum": model.m} if isinstance(model, MoCo) else {}
    return {
        "loss": loss_sum / max(n_seen, 1),
        "lr": lr,
        **momentum,
        "contrastive_acc": acc_sum / max(n_seen, 1),
        "images_per_s": n_seen * world_size() / max(seconds, 1e-9),
        "steps": n_steps,
        "seconds": seconds,
    }
