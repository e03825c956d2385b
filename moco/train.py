"""``moco-search pretrain``: MoCo on a folder of unlabeled images, on CPU, one GPU or DDP.

The loop follows the official main_moco.py (SGD, momentum 0.9, wd 1e-4, lr 0.03 per 256 images)
with the v2 recipe by default, and adds what a user training on their own folder needs: small-data
checks, a pre-decoded image cache, exact resume, Ctrl-C that saves, a JSON line per epoch,
TensorBoard scalars, a kNN monitor and a loss plot.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from moco.checkpoint import LAST, rank_rng, rng_state, save_checkpoint, save_rank_rng, set_rng_state
from moco.config import TrainConfig, resume_config
from moco.data import list_images
from moco.distributed import default_device, init_distributed
from moco.distributed import rank as process_rank
from moco.export import CheckpointError, backbone_from_checkpoint, load_checkpoint_file
from moco.files import DISK_FULL, DiskFullError, exclusive, output_folder_for
from moco.loop import TrainingDiverged, TrainState, train_one_epoch
from moco.mechanisms import Model, build_model
from moco.model import compile_encoders
from moco.monitor import KnnMonitor, verdict
from moco.recipe import Budget, auto_config, check_config
from moco.schedule import Schedule
from moco.trainlog import RunLog, discard_run_outputs, epoch_numbers, read_log
from moco.trainset import holdout, loader, make_dataset, readable_images, shard, view_monitor

__all__ = ["TrainConfig", "TrainingDiverged", "check_config", "log_summary", "train"]

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
"""Held by the process training a run (its pid inside), so that one trains it at a time."""

# The label-free monitors, the kNN monitor and checkpoint_last.pt at most this often (and at the
# first and last epochs): on the 1,274 demo images an epoch is 3 s of steps and they took 0.8 s.
REPORT_SECONDS = 30.0


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _init_from(model: Model, path: str) -> None:
    """Start the encoders (both, for MoCo) from the backbone of ``path`` (ours or official)."""
    state, meta = backbone_from_checkpoint(load_checkpoint_file(path))
    if meta["arch"] != model.cfg.arch or meta["small_stem"] != model.cfg.small_stem:
        raise CheckpointError(
            f"--init-from {path} holds {meta['arch']} (small_stem={meta['small_stem']}), but this "
            f"run builds {model.cfg.arch} (small_stem={model.cfg.small_stem}): pass --arch "
            "and --image-size/--small-stem to match"
        )
    for enc in (model.encoder_q, getattr(model, "encoder_k", None)):
        if enc is None:
            continue
        missing, unexpected = enc.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
    log.info("initialised the encoders from %s (%s)", path, meta["source"])


@contextmanager
def _held(out: Path) -> Iterator[None]:
    """The run folder, locked for the length of the run by the process that writes it (rank 0).

    A second ``pretrain`` into the same ``--out`` (the command run again in another terminal, a
    ``--resume`` while the run still trains) would overwrite its checkpoints and interleave its
    log; it is refused at once instead. A folder made here goes again if the run fails before
    writing into it.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: give a folder for the run")
    if process_rank() != 0:
        yield
        return

    def busy(holder: str) -> str:
        return (
            f"Run {out} is in use by another pretraining process{holder}: let it finish (Ctrl-C "
            "there saves it, and --resume carries it on), or choose another --out"
        )

    with output_folder_for(out), exclusive(out / LOCK_NAME, busy):
        yield


def train(cfg: TrainConfig, given: Collection[str] | None = None) -> Path:
    """Pretrain as ``cfg`` says (``--mechanism``: MoCo by default); return the last checkpoint.

    ``given``: the fields the user set (the CLI's flags), which override a resumed run's saved
    settings; by default, those that differ from ``TrainConfig``'s defaults. A full disk ends
    the run with a ``DiskFullError`` that says what was kept: checkpoints and ``log.jsonl`` are
    written whole or not at all, and the log never runs ahead of ``checkpoint_last.pt``.
    """
    if os.path.realpath(cfg.out) == os.path.realpath(cfg.data):
        # A run kept below the folder is passed over; the folder itself is not: its curves.png
        # became a training image on resume (and an indexed one)
        raise ValueError(
            f"--out {cfg.out} is the image folder itself: give the run a folder of its own, "
            f"such as --out {Path(cfg.out).absolute().parent / 'runs' / Path(cfg.data).name}"
        )
    try:
        with _held(Path(cfg.out)):
            return _train(cfg, given)
    except OSError as e:
        if e.errno not in DISK_FULL or isinstance(e, DiskFullError):
            raise
        out = Path(cfg.out)
        kept = (out / LAST).is_file()
        raise DiskFullError(
            f"Disk full while writing run {out}: nothing was lost ("
            + ("its last checkpoint is kept" if kept else "no checkpoint had been saved yet")
            + ", no temporary file is left); free some space and re-run "
            + ("with --resume to carry on" if kept else "to start it again"),
        ) from e


def _train(cfg: TrainConfig, given: Collection[str] | None) -> Path:
    budget = Budget(cfg.minutes * 60.0) if cfg.minutes > 0 and not cfg.resume else None
    if budget is not None and "epochs" in (given or ()):
        log.warning(
            "--minutes %g plans the run's epochs itself: --epochs %d is ignored",
            cfg.minutes,
            cfg.epochs,
        )
    rank, world, local_rank = init_distributed()
    paths = list_images(cfg.data)
    device = default_device(cfg.device, local_rank)
    out = Path(cfg.out)
    ckpt_path = out / LAST
    start_epoch, skip_steps, resumed = 0, 0, None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        try:
            resumed = load_checkpoint_file(ckpt_path)
        except CheckpointError as e:  # damaged outside the run: it writes whole files
            numbered = sorted(out.glob("checkpoint_0*.pt"))
            raise CheckpointError(
                f"{e}. "
                + (
                    f"Copy the last numbered checkpoint over it ({numbered[-1].name}) to resume "
                    "from there, or start again with another --out"
                    if numbered
                    else f"Start again with another --out, or delete {ckpt_path}"
                )
            ) from None
        start_epoch, skip_steps = int(resumed["epoch"]), int(resumed.get("step", 0))
        cfg, changed = resume_config(cfg, resumed["config"], given)  # the run's own settings
        for name, (saved, now) in sorted(changed.items()):
            log.info("resume: --%s %s (the run had %s)", name.replace("_", "-"), now, saved)
        had = str(resumed["config"].get("data") or cfg.data)
        if os.path.realpath(had) != os.path.realpath(cfg.data):  # said, as a changed flag is
            log.warning("resume: training on %s (the run had %s)", cfg.data, had)
        if cfg.minutes > 0 and not cfg.total_steps:
            # Saved before --minutes had timed its first steps and planned the run: its
            # schedule was a placeholder (the default epochs, with no clock on a resume), so
            # the run starts again, on a budget of its own.
            log.warning(
                "--resume: %s was saved at epoch %d step %d, before --minutes %g had timed the "
                "first steps and planned the run; starting the run again",
                ckpt_path,
                start_epoch,
                skip_steps,
                cfg.minutes,
            )
            cfg = dataclasses.replace(cfg, resume=False)
            resumed, start_epoch, skip_steps = None, 0, 0
            budget = Budget(cfg.minutes * 60.0)
            if rank == 0:
                discard_run_outputs(out)  # the dropped steps' rows, curves, skipped files
    elif ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")
    paths, monitor_paths, held_out = holdout(paths, cfg)
    cfg = check_config(auto_config(cfg, len(paths), device.type, world), len(paths), world)

    _seed_all(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_model(cfg.model_config(len(paths))).to(device)
    if cfg.init_from and resumed is None:
        _init_from(model, cfg.init_from)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_encoders(model)
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(), lr=cfg.base_lr, momentum=0.9, weight_decay=cfg.weight_decay
    )
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        log.info("resumed from %s at epoch %d step %d", ckpt_path, start_epoch, skip_steps)
    net: nn.Module = model
    if world > 1:
        # DDP copies rank 0's buffers to every rank before each step; the memory bank (one
        # entry per image) is kept identical by its own gathered updates instead. torch 2.14
        # deprecates broadcast_buffers, but says to keep it for rank-local buffers until its
        # replacement can skip the first copy too (and torch before 2.14 has no replacement).
        rank_local = {"broadcast_buffers": False} if cfg.mechanism == "memory-bank" else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, **rank_local
            )
    amp = bool(cfg.amp)  # auto_config chose it when unset

    dataset = make_dataset(cfg, paths, device.type)
    if (readable := readable_images(dataset)) is not None and readable < 2:
        raise ValueError(
            f"{readable} of the {len(paths)} training files in {cfg.data} could be read as an "
            "image (the warnings above say why); MoCo needs at least 2"
        )
    monitor = KnnMonitor(cfg, paths, device) if cfg.val_dir and rank == 0 else None
    views = view_monitor(cfg, monitor_paths) if rank == 0 else None
    runlog = RunLog(out, cfg, paths, enabled=rank == 0)  # the run folder: after every refusal
    steps_per_epoch = max(len(paths) // cfg.batch_size, 1)
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    total = cfg.total_steps or cfg.epochs * steps_per_epoch
    warmup = round((cfg.warmup_epochs or 0.0) * steps_per_epoch)
    if budget is not None:  # provisional, until the first steps have been timed
        total = max(total, 1000)
        if cfg.warmup_epochs is None:  # a given one, 0 included, is kept
            warmup = 4 * budget.measure_steps
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
            # the run's current plan: --minutes plans (and re-plans) it inside an epoch
            "config": {**dataclasses.asdict(state.cfg), "model": dataclasses.asdict(model.cfg)},
            "rng": rng_state(),
            "untrained": baseline,
            "log_rows": runlog.pending(),
        }

    state = TrainState(net, model, optimizer, cfg, device, amp, runlog, schedule, budget)
    state.epoch, state.step = start_epoch, skip_steps
    stats: dict[str, float] = {}
    if resumed is not None:
        runlog.restore(resumed.get("log_rows", []))
    elapsed_before = runlog.elapsed_before() if resumed is not None else 0.0

    def clock() -> float:
        """Seconds the run has trained, across resumes (``elapsed_s`` in the log)."""
        return elapsed_before + (budget.elapsed() if budget else time.perf_counter() - t0)

    def period(seconds: float) -> int:
        """Which ``--save-minutes`` period of the run ``seconds`` falls in (0: off)."""
        return int(seconds // (60 * cfg.save_minutes)) if cfg.save_minutes else 0

    saved_mark = period(elapsed_before)  # the last period that has its numbered checkpoint

    reported = time.perf_counter()
    try:
        done = state.epoch >= schedule.epochs  # a finished run, resumed: nothing to do
        if done:
            log.info(
                "nothing to train: the run has done %d of its %d epochs (a larger --epochs "
                "goes on)",
                state.epoch,
                schedule.epochs,
            )
        while not done:
            epoch = state.epoch
            # Each epoch reproducible on its own; ranks differ (augmentations with workers=0).
            _seed_all(cfg.seed * 1_000_003 + epoch + 7919 * rank)
            if resumed is not None and state.step:  # mid-epoch (Ctrl-C): continue its RNG
                if (rng := rank_rng(ckpt_path, rank, resumed)) is not None:
                    set_rng_state(rng)
                else:
                    log.warning("rank %d: no saved random state; it reseeds at the resume", rank)
            skip = state.step * (cfg.batch_size // world)
            idx = shard(len(paths), epoch, cfg, rank, world, skip)
            batches = loader(dataset, idx, cfg, world, epoch, rank, device, state.step)
            stats = train_one_epoch(state, batches)
            cfg = state.cfg  # with --minutes: the epochs and steps planned, as config.json says
            state.epoch, state.step, state.in_epoch = epoch + 1, 0, False
            done = state.epoch >= schedule.epochs or (budget is not None and budget.expired())
            mark = period(clock())
            numbered = bool(cfg.save_every and state.epoch % cfg.save_every == 0)
            numbered = numbered or mark > saved_mark
            # Short epochs (a few hundred images) end every few seconds: the monitors and the
            # checkpoint then cost a fifth of the run. They run at the first and last epochs,
            # for a numbered checkpoint, and otherwise at most every REPORT_SECONDS.
            report = done or numbered or epoch == start_epoch
            report = report or time.perf_counter() - reported >= REPORT_SECONDS
            if report:
                if views is not None:
                    stats["view_recall"] = views(model.encoder_q)
                    stats["untrained_view_recall"] = baseline["view_recall"]
                if monitor is not None:
                    stats["knn_top1"] = monitor(model.encoder_q)
                    stats["untrained_knn_top1"] = baseline["knn_top1"]
            stats["planned_epochs"] = schedule.total_steps / steps_per_epoch
            stats["elapsed_s"] = clock()
            runlog.record(epoch, stats)  # written with the checkpoint, or on Ctrl-C by close
            if not report:
                continue
            if rank == 0:  # at an epoch's end every rank reseeds: no rank's state is needed
                save_checkpoint(ckpt_path, payload(epoch + 1, 0))
                if numbered:
                    save_checkpoint(out / f"checkpoint_{epoch + 1:04d}.pt", payload(epoch + 1, 0))
            runlog.report(epoch, stats)
            if views is not None:
                log.info(
                    "epoch %d: finds augmented copies %.1f%% of the time; untrained %.1f%%",
                    epoch + 1,
                    stats["view_recall"],
                    baseline["view_recall"],
                )
            saved_mark, reported = mark, time.perf_counter()
    except KeyboardInterrupt:
        # Inside an epoch: resume at its step. Between epochs (monitor, logging, saving): the
        # finished epochs are all in the weights, so resume at the next one.
        epoch, step = state.epoch, state.step
        if rank == 0:
            save_checkpoint(ckpt_path, payload(epoch, step))
            log.warning(
                "interrupted: saved %s at epoch %d step %d; continue with --resume",
                ckpt_path,
                epoch,
                step,
            )
        else:  # each rank's own random stream, for an exact mid-epoch resume
            save_rank_rng(ckpt_path, rank, epoch, step)
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


def log_summary(ckpt: Path) -> str:
    last = read_log(ckpt.parent)
    if not last:
        return f"checkpoint: {ckpt}"
    e = last[-1]
    return (
        f"epoch {epoch_numbers(last)[-1]}: loss {e['loss']:.4f}, contrastive acc "
        f"{e['contrastive_acc']:.1f}%, {e['images_per_s']:.0f} img/s; checkpoint: {ckpt}"
    )
