"""``moco-search pretrain``: MoCo on a folder of unlabeled images, on CPU, one GPU or DDP.

The loop follows the official main_moco.py (SGD, momentum 0.9, wd 1e-4, lr 0.03 per 256 images)
with the v2 recipe by default, and adds what a user training on their own folder needs: small-data
checks, a pre-decoded image cache, exact resume, Ctrl-C that saves, a JSON line per epoch,
TensorBoard scalars, a kNN monitor and a loss plot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from moco.checkpoint import LAST, rng_state, save_checkpoint, set_rng_state
from moco.config import TrainConfig, resume_config
from moco.data import ImageFiles, collate_skip, list_images
from moco.export import CheckpointError, backbone_from_checkpoint, load_checkpoint_file
from moco.loss import topk_accuracy
from moco.model import MoCo
from moco.monitor import KnnMonitor, verdict
from moco.recipe import WARMUP_FRACTION, Budget, auto_config, check_config
from moco.schedule import Schedule
from moco.trainlog import RunLog
from moco.trainset import holdout, make_dataset, view_monitor

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; continuing would only write garbage checkpoints."""


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _shard(n: int, epoch: int, cfg: TrainConfig, rank: int, world: int, skip: int) -> list[int]:
    """This rank's indexes for ``epoch``: one seeded permutation shared by all ranks."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = (n // cfg.batch_size) * cfg.batch_size // world
    return perm[rank::world][:per_rank][skip:]


def _loader(
    ds: ImageFiles, idx: list[int], cfg: TrainConfig, world: int, epoch: int, rank: int = 0
) -> DataLoader:
    # Worker seeds, deterministic; per rank, or every rank would draw the same augmentations.
    g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch + 1_000_003 * rank)
    return DataLoader(
        torch.utils.data.Subset(ds, idx),
        batch_size=cfg.batch_size // world,
        shuffle=False,
        num_workers=cfg.workers,
        collate_fn=collate_skip,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        generator=g,
        persistent_workers=False,
    )


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _init_from(model: MoCo, path: str) -> None:
    """Start both encoders from the backbone of ``path`` (ours or an official MoCo checkpoint)."""
    state, meta = backbone_from_checkpoint(load_checkpoint_file(path))
    if meta["arch"] != model.cfg.arch or meta["small_stem"] != model.cfg.small_stem:
        raise CheckpointError(
            f"--init-from {path} holds {meta['arch']} (small_stem={meta['small_stem']}), but this "
            f"run builds {model.cfg.arch} (small_stem={model.cfg.small_stem}): pass --arch "
            "and --image-size/--small-stem to match"
        )
    for enc in (model.encoder_q, model.encoder_k):
        missing, unexpected = enc.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
    log.info("initialised both encoders from %s (%s)", path, meta["source"])


@dataclass
class _Run:
    """What one epoch of training needs, passed as one object."""

    step_fn: nn.Module
    model: MoCo
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    amp: bool
    runlog: RunLog
    schedule: Schedule
    budget: Budget | None


def train(cfg: TrainConfig) -> Path:
    """Pretrain MoCo as ``cfg`` says; return the path of the last checkpoint."""
    budget = Budget(cfg.minutes * 60.0) if cfg.minutes > 0 and not cfg.resume else None
    rank, world, local_rank = _init_distributed()
    paths = list_images(cfg.data)
    device = _device(cfg, local_rank)
    out = Path(cfg.out)
    ckpt_path = out / LAST
    start_epoch, skip_steps, resumed = 0, 0, None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        resumed = load_checkpoint_file(ckpt_path)
        start_epoch, skip_steps = int(resumed["epoch"]), int(resumed.get("step", 0))
        cfg, changed = resume_config(cfg, resumed["config"])  # the run's own settings
        for name, (saved, now) in sorted(changed.items()):
            log.info("resume: --%s %s (the run had %s)", name.replace("_", "-"), now, saved)
    elif ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")
    paths, monitor_paths, held_out = holdout(paths, cfg)
    cfg = check_config(auto_config(cfg, len(paths), device.type), len(paths), world)

    _seed_all(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = MoCo(cfg.model_config()).to(device)
    if cfg.init_from and resumed is None:
        _init_from(model, cfg.init_from)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(), lr=cfg.base_lr, momentum=0.9, weight_decay=cfg.weight_decay
    )
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        log.info("resumed from %s at epoch %d step %d", ckpt_path, start_epoch, skip_steps)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_fn = torch.compile(net) if cfg.compile else net
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"

    dataset = make_dataset(cfg, paths)
    runlog = RunLog(out, cfg, paths, enabled=rank == 0)
    monitor = KnnMonitor(cfg, paths, device) if cfg.val_dir and rank == 0 else None
    views = view_monitor(cfg, monitor_paths) if rank == 0 else None
    steps_per_epoch = max(len(paths) // cfg.batch_size, 1)
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    total = cfg.total_steps or cfg.epochs * steps_per_epoch
    warmup = round((cfg.warmup_epochs or 0.0) * steps_per_epoch)
    if budget is not None:  # provisional, until the first steps have been timed
        total = max(total, 1000)
        warmup = max(warmup, 4 * budget.measure_steps)
    schedule = Schedule(steps_per_epoch, total, warmup)

    # The bar to clear: the network before its first step (on resume: as first measured).
    t0 = time.perf_counter()
    baseline: dict[str, float] = dict(resumed.get("untrained", {})) if resumed else {}
    if views is not None and "view_recall" not in baseline:
        baseline["view_recall"] = views(model.encoder_q)
    if monitor is not None and "knn_top1" not in baseline:
        baseline["knn_top1"] = monitor(model.encoder_q)
    monitor_seconds = time.perf_counter() - t0
    if views is not None:
        log.info(
            "untrained network: finds augmented copies of %d %s images %.1f%% of the time "
            "(chance %.1f%%)%s",
            len(views),
            "held-out" if held_out else "training",
            baseline["view_recall"],
            100 / len(views),
            f"; kNN top-1 {baseline['knn_top1']:.1f}%" if "knn_top1" in baseline else "",
        )
    if budget is not None:
        budget.overhead = monitor_seconds + 1.0 + (1.0 if cfg.workers else 0.0)

    def payload(epoch: int, step: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "config": {**dataclasses.asdict(cfg), "model": dataclasses.asdict(model.cfg)},
            "rng": rng_state(),
            "untrained": baseline,
        }

    run = _Run(step_fn, model, optimizer, cfg, device, amp, runlog, schedule, budget)
    epoch = completed = start_epoch
    stats: dict[str, float] = {}
    try:
        while epoch < schedule.epochs and not (budget and budget.expired()):
            # Each epoch reproducible on its own; ranks differ (augmentations with workers=0).
            _seed_all(cfg.seed * 1_000_003 + epoch + 7919 * rank)
            skip = skip_steps if epoch == start_epoch else 0
            if resumed is not None and skip and "rng" in resumed:
                set_rng_state(resumed["rng"])  # mid-epoch (Ctrl-C): continue the interrupted RNG
            idx = _shard(len(paths), epoch, cfg, rank, world, skip * (cfg.batch_size // world))
            loader = _loader(dataset, idx, cfg, world, epoch, rank)
            stats = _train_one_epoch(run, loader, epoch, skip)
            cfg = run.cfg  # with --minutes: the epochs and steps planned, as config.json says
            completed = epoch + 1
            if views is not None:
                stats["view_recall"] = views(model.encoder_q)
                stats["untrained_view_recall"] = baseline["view_recall"]
            if monitor is not None:
                stats["knn_top1"] = monitor(model.encoder_q)
                stats["untrained_knn_top1"] = baseline["knn_top1"]
            stats["planned_epochs"] = schedule.total_steps / steps_per_epoch
            stats["elapsed_s"] = budget.elapsed() if budget else time.perf_counter() - t0
            runlog.epoch_end(epoch, stats)
            if views is not None:
                log.info(
                    "epoch %d: finds augmented copies %.1f%% of the time; untrained %.1f%%",
                    epoch + 1,
                    stats["view_recall"],
                    baseline["view_recall"],
                )
            if rank == 0:
                save_checkpoint(ckpt_path, payload(epoch + 1, 0))
                if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                    save_checkpoint(out / f"checkpoint_{epoch + 1:04d}.pt", payload(epoch + 1, 0))
            epoch += 1
    except KeyboardInterrupt as e:
        # Inside an epoch: resume at its step. Between epochs (monitor, logging, saving): the
        # finished epochs are all in the weights, so resume at the next one.
        epoch, step = (epoch, e.step) if hasattr(e, "step") else (completed, 0)
        if rank == 0:
            save_checkpoint(ckpt_path, payload(epoch, step))
            log.warning(
                "interrupted: saved %s at epoch %d step %d; continue with --resume",
                ckpt_path,
                epoch,
                step,
            )
        runlog.close()
        raise
    runlog.finish()
    if budget is not None:
        log.info("--minutes %g: stopped after %.1f minutes", cfg.minutes, budget.elapsed() / 60)
        if not budget.planned:
            log.warning(
                "--minutes %g ran out before the first steps could be timed: the checkpoint is "
                "barely trained; give it more minutes",
                cfg.minutes,
            )
    if views is not None and "view_recall" in stats:
        knn = None
        if "knn_top1" in stats:
            knn = (stats["knn_top1"], baseline["knn_top1"])
        trained, untrained = stats["view_recall"], baseline["view_recall"]
        log.info(verdict(trained, untrained, len(views), knn, held_out))
    if world > 1:
        dist.barrier()
    return ckpt_path


def _batches(
    loader: DataLoader, runlog: RunLog, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The two views and the dataset indexes of each batch's good images; logs broken files."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    for views, ids, bad in loader:
        n = 0 if views is None else views[0].shape[0]
        if world > 1:
            # Broken files shrink a rank's batch, but keys are all-gathered with one shape: every
            # rank steps with the smallest batch (or all skip), and rank 0 logs everyone's files.
            agree = torch.tensor([-n, len(bad)], device=device)
            dist.all_reduce(agree, op=dist.ReduceOp.MAX)
            n, most_bad = -int(agree[0]), int(agree[1])
            if most_bad:
                mine = torch.full((most_bad,), -1, dtype=torch.long, device=device)
                mine[: len(bad)] = torch.tensor(bad, dtype=torch.long)
                parts = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(parts, mine)
                bad = [i for i in torch.cat(parts).tolist() if i >= 0]
        if bad:
            runlog.skipped(bad)
        if n:
            yield views[0][:n], views[1][:n], ids[:n]


def _plan(run: _Run, done: int) -> None:
    """Fit the schedule to the time left, from the pace measured so far; log what was chosen.

    The warm-up is set once, at the first plan; later plans only move the cosine's end.
    """
    assert run.budget is not None
    sched, cfg, first = run.schedule, run.cfg, not run.budget.planned
    before = sched.total_steps
    sched.total_steps = max(run.budget.plan(done, sched.steps_per_epoch), done + 1)
    if first:
        wanted = cfg.warmup_epochs
        warmup = wanted * sched.steps_per_epoch if wanted is not None else None
        sched.warmup_steps = round(warmup or WARMUP_FRACTION * sched.total_steps)
    run.cfg = run.runlog.cfg = dataclasses.replace(
        cfg, epochs=sched.epochs, total_steps=sched.total_steps
    )
    if run.runlog.enabled:
        config = json.dumps(dataclasses.asdict(run.cfg), indent=2)
        (Path(cfg.out) / "config.json").write_text(config + "\n")
    if not first and abs(sched.total_steps - before) < 0.05 * before:
        return
    step_s = run.budget.step_seconds()
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


def _train_one_epoch(run: _Run, loader: DataLoader, epoch: int, skip: int) -> dict[str, float]:
    model, optimizer, cfg, device = run.model, run.optimizer, run.cfg, run.device
    sched, budget = run.schedule, run.budget
    model.train()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    steps = min(sched.steps_per_epoch, sched.total_steps - epoch * sched.steps_per_epoch)
    loss_sum, acc_sum, n_seen, n_steps = 0.0, 0.0, 0, 0
    lr = float("nan")
    t0 = time.perf_counter()
    bar = run.runlog.progress(epoch, total=steps, initial=skip)
    step = skip
    try:
        for im_q, im_k, ids in _batches(loader, run.runlog, device):
            steps = min(sched.steps_per_epoch, sched.total_steps - epoch * sched.steps_per_epoch)
            if step >= steps or (budget is not None and budget.expired()):
                break
            global_step = epoch * sched.steps_per_epoch + step
            lr = sched.lr(cfg, global_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.m = sched.momentum(cfg, global_step)
            im_q = im_q.to(device, non_blocking=True, memory_format=fmt)
            im_k = im_k.to(device, non_blocking=True, memory_format=fmt)
            ids = ids.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp):
                loss, logits, labels = run.step_fn(im_q, im_k, ids)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch} step {step}; lower --lr "
                    f"(now {cfg.base_lr:.4g}) or --moco-t, or check the images"
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
            step += 1
            if budget is not None:
                budget.tick(first_in_epoch=n_steps == 1)
                if budget.due(global_step + 1):
                    _plan(run, global_step + 1)
                    cfg = run.cfg
                    bar.total = min(
                        sched.steps_per_epoch, sched.total_steps - epoch * sched.steps_per_epoch
                    )
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", acc=f"{acc:.0f}", img_s=f"{n_seen / elapsed:.0f}"
            )
            run.runlog.step(global_step + 1, loss.item(), lr)
    except KeyboardInterrupt as e:
        e.step = step  # type: ignore[attr-defined]
        raise
    finally:
        bar.close()
    world = dist.get_world_size() if dist.is_initialized() else 1
    seconds = time.perf_counter() - t0
    return {
        "loss": loss_sum / max(n_seen, 1),
        "lr": lr,
        "momentum": model.m,
        "contrastive_acc": acc_sum / max(n_seen, 1),
        "images_per_s": n_seen * world / max(seconds, 1e-9),
        "steps": n_steps,
        "seconds": seconds,
    }


def log_summary(ckpt: Path) -> str:
    last = [json.loads(x) for x in (ckpt.parent / "log.jsonl").read_text().splitlines() if x]
    if not last:
        return f"checkpoint: {ckpt}"
    e = last[-1]
    return (
        f"epoch {e['epoch'] + 1}: loss {e['loss']:.4f}, contrastive acc "
        f"{e['contrastive_acc']:.1f}%, {e['images_per_s']:.0f} img/s; checkpoint: {ckpt}"
    )
