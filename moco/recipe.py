"""The recipe a run gets when flags are left unset, the small-data checks, and the time budget.

``auto_config`` fills every field left ``None`` from the data size and the device. The values
were chosen by measurement on small real sets in a 15-minute CPU budget (docs/pretraining.md,
"Ablation"); the paper's ImageNet settings (K=65536, m=0.999, batch 256, lr 0.03) stay
available as flags.

``Budget`` implements ``--minutes``: the run measures its own pace over its first steps, then
sets the schedule (warm-up, cosine to zero) to end when the time is up, and stops itself then.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from moco.config import BN_SPLITS, MECHANISMS, queue_only_flags
from moco.encoder_config import MAX_IMAGE_SIZE
from moco.encoders import check_arch
from moco.schedule import steps_in_budget

log = logging.getLogger(__name__)

CPU_IMAGE_SIZE = 32  # resnet18, ImageNet stem: 100-270 img/s on 2 idle cores (64 px: 40-100)
GPU_IMAGE_SIZE = 224
# 128 on CPU: at 32 px 2 cores compute ~1.2x the images a second of batch 64 (per-op
# overheads spread over more images); on emoji it ended ahead of batch 64 at equal
# epochs (2 seeds) and of the official recipe in 15 minutes (2 seeds), docs/pretraining.md.
CPU_BATCH, GPU_BATCH = 128, 256
QUEUE_FRACTION = 0.1  # K as a share of the images (the paper's is 5% of ImageNet)
LR_PER_256 = 0.03  # lr = LR_PER_256 x batch / 256: the paper's and the official CIFAR demo's
MOMENTUM = 0.99  # the official CIFAR demo's m; the "fit" schedule lowers it for short runs
WARMUP_FRACTION = 0.05  # linear lr warm-up over this share of a --minutes run
CROP_MIN, COLOR = 0.2, 1.0
# Key-encoder BatchNorm groups (``BN_SPLITS``) hold at least this many images: BatchNorm over
# one image's 1x1 map (layer4 at 32 px) erases it, so every key of a batch of 8 in 8 groups
# came out the same (and end-to-end, which takes gradients through the split, stopped with a
# PyTorch error).
MIN_SPLIT_GROUP = 4
# InfoNCE temperature of MoCo v2 on small images (<= SMALL_IMAGE_MAX px): the official CIFAR
# demo's. On emoji at 32 px it found the same emoji across vendors more often than v2's 0.2 at
# every checkpoint of two 15-minute pairs (two seeds) and by 2.9 points after 5 minutes;
# kNN and probe level (docs/pretraining.md). Larger images keep the paper's 0.2 (unmeasured).
SMALL_IMAGE_T, SMALL_IMAGE_MAX = 0.1, 96
# SGD weight decay: 5e-4 on small images, the official CIFAR demo's (and most CIFAR recipes');
# the paper's ImageNet 1e-4 above. On emoji at 32 px, at equal work (15 epochs, two
# seeds), 5e-4 found the same emoji across vendors more often, kNN and probe level or ahead
# (docs/pretraining.md). With BatchNorm, decay shrinks the weights and so raises the
# effective step size as the run goes: a short run learns faster.
SMALL_IMAGE_WD, PAPER_WD = 5e-4, 1e-4
# bf16 autocast on a CPU with bf16 units pays from this size up (2 cores with AMX: resnet18's
# forward and backward 0.9x fp32 at 32 px, 1.4x at 48; the MoCo step 1.6x at 64 px and 2.4x at
# 224, bench/results/bench_pretrain_20261205_103041_cpu.json); smaller images stay fp32.
CPU_BF16_MIN_SIZE = 48


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX-512 BF16).

    There oneDNN runs bf16 convolutions several times faster than fp32; elsewhere bf16 is
    emulated and slower, so autocast stays off. (``torch.cpu``'s probes are private: a torch
    without them counts as no.)
    """
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_amp(device_type: str, image_size: int) -> bool:
    """bf16 autocast where it measured faster: CUDA, and CPUs with bf16 units from 48 px."""
    if device_type == "cuda":
        return True
    return device_type == "cpu" and image_size >= CPU_BF16_MIN_SIZE and cpu_has_bf16()


def auto_config(cfg: Any, num_images: int, device_type: str, world: int = 1) -> Any:
    """``cfg`` with each field left ``None`` set for ``num_images`` images on ``device_type``,
    trained by ``world`` processes.

    On CPU the images are small (32 px) and keep ResNet's ImageNet stem: the CIFAR stem
    (3x3/1, no pool) costs 16x the compute, 14 against 70 img/s at 64 px on 2 cores. 32 px,
    not 64: on emoji, 15 idle minutes at 64 px (665 steps) left the label-free monitor below
    the untrained network (7.4% against 9.4%) while 32 px (1,197 steps) lifted it to 20.3%.

    ``embed_size``, what ``export`` embeds at: the training size. 1.5x it (48 px, the default
    until 2026-12-05) finds the same emoji drawn by another vendor more often (instance R@1 29.5
    against 23.9 after 15 minutes), but it is a size the network never saw (at 32 px its last
    stage works on a 1x1 map, so the off-centre taps of its 3x3 convolutions never learned) and
    categories suffer everywhere: kNN top-1 on Tux Paint 21.6 against 50.7 (the random network:
    26.1), on emoji 64.2 against 70.1 (docs/pretraining.md). ``--embed-size`` keeps the choice.
    """
    cpu = device_type == "cpu"
    size = cfg.image_size
    if size is None:
        size = CPU_IMAGE_SIZE if cpu else GPU_IMAGE_SIZE
    small = cfg.small_stem if cfg.small_stem is not None else (size <= 96 and not cpu)
    batch = cfg.batch_size
    if batch is None:
        # at least 8 steps an epoch, so that a tiny folder still gets a usable schedule
        batch = max(min(CPU_BATCH if cpu else GPU_BATCH, num_images // 8), min(8, num_images))
        # in whole split-BN groups on every process: 567 images gave batch 70, which turned
        # the key encoder's split-BN off with a warning about a flag the user never gave
        unit = world * max(cfg.bn_splits or BN_SPLITS, 1)
        batch = max(batch - batch % (unit if batch >= unit else world), 1)
    k = cfg.moco_k
    if k is None:
        k = min(max(round(QUEUE_FRACTION * num_images), batch), 65536)
    return dataclasses.replace(
        cfg,
        image_size=size,
        embed_size=cfg.embed_size if cfg.embed_size is not None else size,
        amp=cfg.amp if cfg.amp is not None else default_amp(device_type, size),
        small_stem=small,
        batch_size=batch,
        bn_splits=splits if (splits := cfg.bn_splits) is not None else auto_splits(batch // world),
        moco_k=k,
        moco_m=cfg.moco_m if cfg.moco_m is not None else MOMENTUM,
        lr=cfg.lr if cfg.lr is not None else LR_PER_256 * max(batch, 1) / 256,
        crop_min=cfg.crop_min if cfg.crop_min is not None else CROP_MIN,
        color=cfg.color if cfg.color is not None else COLOR,
        moco_t=cfg.moco_t if cfg.moco_t is not None else default_temperature(cfg, size),
        weight_decay=cfg.weight_decay
        if cfg.weight_decay is not None
        else (SMALL_IMAGE_WD if size <= SMALL_IMAGE_MAX else PAPER_WD),
    )


def default_temperature(cfg: Any, image_size: int) -> float | None:
    """``SMALL_IMAGE_T`` for a new v2 run on images of at most ``SMALL_IMAGE_MAX`` px; else
    None, which ``TrainConfig.model_config`` reads as the paper's (v1 0.07, v2 0.2).

    Measured with MoCo's queue; the end-to-end and memory-bank mechanisms get the same T, so
    that ``ablate`` compares mechanisms, not temperatures, as the paper does. A resumed run's
    saved ``moco_t`` of None is kept: it trained with 0.2 (it started before this default), and
    its loss must not change temperature half-way.
    """
    if cfg.resume or cfg.version != "v2" or image_size > SMALL_IMAGE_MAX:
        return None
    return SMALL_IMAGE_T


def auto_splits(per_process: int) -> int:
    """The most key-encoder BatchNorm groups, up to ``BN_SPLITS``, that split a batch of
    ``per_process`` images evenly into groups of at least ``MIN_SPLIT_GROUP``: 8 for the
    automatic batches from 32 up (multiples of 8), 4 for 36, 2 for a tiny folder's 8, 1 (plain
    BatchNorm) for 6."""
    s = BN_SPLITS
    while s > 1 and (per_process % s or per_process // s < MIN_SPLIT_GROUP):
        s //= 2
    return s


SIDES = f"from 8 to {MAX_IMAGE_SIZE} pixels"


def check_ranges(cfg: Any) -> None:
    """Refuse a number no run can use, naming its flag (unset ones, ``None``, are chosen later):
    these failed deep inside a run, as a ZeroDivisionError (``--epochs 0``, ``--moco-k 0``), a
    BatchNorm error (``--batch-size 0``), a NaN loss (``--moco-t 0``), or trained on with a
    diverging key encoder (``--moco-m 1.5``). NaN and infinity are refused for every flag:
    ``--minutes nan`` passed the ">= 0" check (NaN compares false) and trained for 200 epochs."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    for name, ok, need in (
        ("epochs", cfg.epochs >= 1, ">= 1"),
        ("batch_size", cfg.batch_size is None or cfg.batch_size >= 2, ">= 2"),
        ("image_size", cfg.image_size is None or 8 <= cfg.image_size <= MAX_IMAGE_SIZE, SIDES),
        ("embed_size", cfg.embed_size is None or 8 <= cfg.embed_size <= MAX_IMAGE_SIZE, SIDES),
        ("bn_splits", cfg.bn_splits is None or cfg.bn_splits >= 1, ">= 1 (1: off)"),
        ("lr", cfg.lr is None or cfg.lr > 0, "> 0"),
        ("weight_decay", cfg.weight_decay is None or cfg.weight_decay >= 0, ">= 0"),
        ("moco_t", cfg.moco_t is None or cfg.moco_t > 0, "> 0"),
        ("moco_k", cfg.moco_k is None or cfg.moco_k >= 1, ">= 1"),
        ("moco_m", cfg.moco_m is None or 0 <= cfg.moco_m <= 1, "in [0, 1]"),
        ("moco_dim", cfg.moco_dim >= 1, ">= 1"),
        ("crop_min", cfg.crop_min is None or 0 < cfg.crop_min <= 1, "in (0, 1]"),
        ("color", cfg.color is None or cfg.color >= 0, ">= 0"),
        ("workers", cfg.workers >= 0, ">= 0 (0: in this process)"),
        ("knn_k", cfg.knn_k >= 1, ">= 1"),  # the --val-dir monitor's vote, at the first epoch end
        ("knn_t", cfg.knn_t > 0, "> 0"),
    ):
        if not ok:
            flag = name.replace("_", "-")
            raise ValueError(f"--{flag} must be {need}, got {getattr(cfg, name)}")


def check_config(cfg: Any, num_images: int, world: int = 1) -> Any:
    """Refuse impossible settings, warn about poor ones, and fix them when ``adapt`` is set."""
    check_arch(cfg.arch)
    if cfg.bn_splits is None:  # not through auto_config: its choice
        cfg = dataclasses.replace(cfg, bn_splits=auto_splits(max(cfg.batch_size // world, 1)))
    if cfg.version not in ("v1", "v2"):
        raise ValueError(f"Unknown MoCo version {cfg.version!r}; valid: v1, v2")
    if cfg.augment not in ("auto", "batch", "pil"):
        raise ValueError(f"Unknown --augment {cfg.augment!r}; valid: auto, batch, pil")
    if cfg.mechanism not in MECHANISMS:
        raise ValueError(f"Unknown --mechanism {cfg.mechanism!r}; valid: {', '.join(MECHANISMS)}")
    if cfg.mechanism == "memory-bank" and not 0.0 <= cfg.bank_t < 1.0:
        raise ValueError(f"--bank-t {cfg.bank_t} must be in [0, 1)")
    if cfg.m_schedule not in ("fit", "cosine", "constant"):
        raise ValueError(f"Unknown --m-schedule {cfg.m_schedule!r}; valid: fit, cosine, constant")
    for flag in ("minutes", "save_minutes", "save_every", "max_steps"):
        if getattr(cfg, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (0: off)")
    if cfg.warmup_epochs is not None and cfg.warmup_epochs < 0:
        raise ValueError("--warmup-epochs must be >= 0 (0: none)")
    if cfg.local_crops < 0 or (cfg.local_size is not None and cfg.local_size < 8):
        raise ValueError("--local-crops must be >= 0 and --local-size >= 8")
    if cfg.exclude_nearest < 0:
        raise ValueError("--exclude-nearest must be >= 0 (0: off)")
    if (flags := queue_only_flags(cfg)) and cfg.mechanism != "moco":
        need = "needs" if len(flags) == 1 else "need"
        raise ValueError(f"{' and '.join(flags)} {need} --mechanism moco (a queue of keys)")
    if cfg.local_crops and cfg.augment == "pil":
        raise ValueError("--local-crops needs the batched augmentation (not --augment pil)")
    if num_images == 0:
        raise ValueError(
            f"No images found in {cfg.data} (looked for jpg, png, webp, bmp, tif, gif)"
        )
    if num_images == 1:
        raise ValueError(f"{cfg.data} holds one image: MoCo tells images apart, it needs 2 or more")
    check_ranges(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by {world} processes")
    changes: dict[str, Any] = {}
    if cfg.batch_size > num_images:
        msg = f"batch size {cfg.batch_size} exceeds the {num_images} images"
        if not cfg.adapt:
            raise ValueError(msg + "; pass a smaller --batch-size or --adapt")
        changes["batch_size"] = max(world, num_images - num_images % world)
        fewer = min(cfg.bn_splits, auto_splits(changes["batch_size"] // world))
        if cfg.bn_splits > 1 and fewer != cfg.bn_splits:  # in whole groups of the smaller batch
            changes["bn_splits"] = fewer
    batch = changes.get("batch_size", cfg.batch_size)
    moco = cfg.mechanism == "moco"
    if cfg.mechanism == "end-to-end":
        log.info(
            "end-to-end: K = batch - 1 = %d negatives (the batch's other images); --moco-k is "
            "not used",
            batch - 1,
        )
    if moco and cfg.moco_m == 0:
        log.warning(
            "--moco-m 0 makes the key encoder a copy of the query encoder at every step; the "
            "paper reports that training then fails to converge (the loss oscillates)"
        )
    if moco and cfg.moco_k > num_images // 4:
        # Measured on the 1,274-image demo (docs/pretraining.md): K=1024 learned far more slowly
        # than K=128, even with a query's own image masked out of the queue. The paper's queue is
        # 5% of ImageNet; a tenth of the images worked here.
        k = max(batch, num_images // 10)
        msg = (
            f"queue size K={cfg.moco_k} is {cfg.moco_k / num_images:.0%} of the {num_images} "
            "images; on small collections a queue of about a tenth of them trains better"
        )
        if cfg.adapt:
            changes["moco_k"] = k
        else:
            log.warning("%s; consider --moco-k %d (or --adapt)", msg, k)
    total_steps = cfg.total_steps or cfg.epochs * max(num_images // batch, 1)
    m = min(cfg.moco_m, max(0.9, 1.0 - 10.0 / total_steps))
    if moco and cfg.m_schedule == "constant" and m < cfg.moco_m:
        # The key encoder averages the query encoder over ~1/(1-m) steps; when that is a large part
        # of the run the keys stay close to the random initial network and training stalls.
        # (Below 0.9 nothing is suggested: such runs are too short for any momentum to matter.)
        msg = (
            f"momentum m={cfg.moco_m} averages the key encoder over {1 / (1 - cfg.moco_m):.0f} "
            f"steps, too many for a run of {total_steps} steps"
        )
        if cfg.adapt:
            changes["moco_m"] = round(m, 4)
        else:
            log.warning("%s; consider --moco-m %.3g (or --adapt)", msg, m)
    scaled = LR_PER_256 * batch / 256
    if cfg.lr is not None and not 0.5 <= cfg.lr / scaled <= 2.0:
        msg = (
            f"lr {cfg.lr} is far from {LR_PER_256} x batch/256 = {scaled:.4g} (linear scaling rule)"
        )
        if cfg.adapt:
            changes["lr"] = scaled
        else:
            log.warning(msg)
    per, splits = batch // world, changes.get("bn_splits", cfg.bn_splits)
    if splits > 1 and per % splits == 0 and per // splits < 2:
        raise ValueError(
            f"--bn-splits {splits} splits a batch of {per} per process into groups of one "
            "image, and BatchNorm over one image erases it; pass a smaller --bn-splits (leave it "
            "unset for groups of at least 4) or a larger --batch-size"
        )
    if splits > 1 and per % splits:
        log.warning(
            "batch per process %d is not divisible by --bn-splits %d: plain BatchNorm is used",
            per,
            splits,
        )
    if not changes:
        return cfg
    log.info("adapted to %d images: %s", num_images, adapted_line(cfg, changes))
    return dataclasses.replace(cfg, **changes)


_SYMBOL = {"batch_size": "batch", "moco_k": "K", "moco_m": "m", "lr": "lr"}


def adapted_line(cfg: Any, changes: dict[str, Any]) -> str:
    """``"K 65536 -> 880, m 0.999 -> 0.9927"``: what ``--adapt`` changed, old to new."""

    def num(v: Any) -> str:
        return str(v) if isinstance(v, int) else f"{v:.4g}"

    return ", ".join(
        f"{_SYMBOL.get(k, k)} {num(getattr(cfg, k))} -> {num(v)}" for k, v in changes.items()
    )


def warmup_epochs(given: float | None, total_steps: int, steps_per_epoch: int) -> float:
    """The lr warm-up of a run of ``total_steps``, in epochs: ``given`` when the user gave one
    (0: none, as the official recipe has), else ``WARMUP_FRACTION`` of the run. One rule for
    ``--minutes`` and the benchmark's ``--steps`` runs, so the two train alike.

    Examples:
        >>> warmup_epochs(None, 1000, 10), warmup_epochs(0.0, 1000, 10)
        (5.0, 0.0)
    """
    return given if given is not None else WARMUP_FRACTION * total_steps / steps_per_epoch


@dataclass
class Budget:
    """A wall-clock budget: measure the pace of the first steps, plan the steps that fit.

    ``tick`` after every step. Gaps at an epoch's start (the monitor, the checkpoint, new
    loader workers) are counted as per-epoch overhead, not as step time.
    """

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    measure_steps: int = 10
    overhead: float = 2.0  # seconds per epoch boundary, until one is measured
    step_times: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    planned: bool = False
    replan_every: int = 25
    _planned_at: int = 0
    _planned_gaps: int = 0
    _last: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.elapsed() >= self.seconds

    def tick(self, first_in_epoch: bool) -> None:
        now = time.perf_counter()
        if self._last is not None:
            (self.gaps if first_in_epoch else self.step_times).append(now - self._last)
        self._last = now

    def measured(self) -> bool:
        """Enough steps timed to plan (or a tenth of the budget gone with at least two)."""
        n = len(self.step_times)
        return n >= self.measure_steps or (n >= 2 and self.elapsed() > 0.1 * self.seconds)

    def due(self, done_steps: int) -> bool:
        """Time to plan: once measured, then again every ``replan_every`` steps, and as soon as
        the first epoch boundary is timed if the plan before it guessed ``overhead`` (a short
        run on a small folder crosses many boundaries: a wrong guess cut it short by a fifth).

        Re-planning follows a machine whose load changes (other jobs on a shared CPU); the
        cosine moves by the few percent the estimate changes, never back to the warm-up.
        """
        if not self.planned:
            return self.measured()
        if self.gaps and not self._planned_gaps:  # the epoch overhead was a guess: measured now
            return True
        return done_steps - self._planned_at >= self.replan_every

    def step_seconds(self) -> float:
        """The median of the recent step times (the very first is often slow)."""
        times = sorted((self.step_times[1:] or self.step_times)[-50:])
        return times[len(times) // 2] if times else 1.0

    def plan(self, done_steps: int, steps_per_epoch: int) -> int:
        """Total steps of the run: those done plus those that fit in the time left.

        The time after the last step (a last monitor and checkpoint) costs one more overhead.
        """
        self.planned, self._planned_at, self._planned_gaps = True, done_steps, len(self.gaps)
        step = self.step_seconds()
        if self.gaps:
            self.overhead = max(sorted(self.gaps)[len(self.gaps) // 2] - step, 0.0)
        left = self.seconds - self.elapsed()
        return done_steps + steps_in_budget(left, step, steps_per_epoch, self.overhead)
