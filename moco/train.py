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

from moco.augment import TwoCropsTransform, moco_transform
from moco.checkpoint import LAST, rng_state, save_checkpoint, set_rng_state
from moco.data import ImageFiles, collate_skip, list_images
from moco.encoders import check_arch
from moco.export import CheckpointError, backbone_from_checkpoint, load_checkpoint_file
from moco.loss import topk_accuracy
from moco.model import MoCo, ModelConfig
from moco.monitor import KnnMonitor
from moco.schedule import cosine_lr, step_lr, step_milestones
from moco.trainlog import RunLog

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; continuing would only write garbage checkpoints."""


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    version: str = "v2"
    arch: str = "resnet18"
    small_stem: bool | None = None  # None: on when image_size <= 96
    image_size: int = 224
    epochs: int = 200
    batch_size: int = 256
    lr: float | None = None  # None: 0.03 * batch_size / 256 (the paper's lr per 256 images)
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float | None = None  # None: 0.07 for v1, 0.2 for v2
    symmetric: bool = False
    bn_splits: int = 8  # shuffle-BN emulation on one device (official CIFAR demo); 1 disables
    sync_bn: bool = False
    adapt: bool = False  # fit K and lr to the data and batch instead of only warning
    workers: int = 2
    cache: str = "auto"  # pre-decoded images in memory: auto | on | off
    seed: int = 0
    deterministic: bool = False
    resume: bool = False
    init_from: str | None = None
    val_dir: str | None = None
    knn_k: int = 200
    knn_t: float = 0.1
    device: str | None = None
    amp: bool | None = None  # None: bf16 autocast on CUDA
    channels_last: bool = True
    compile: bool = False
    save_every: int = 0  # also keep checkpoint_NNNN.pt every N epochs (0: only the last)
    max_steps: int = 0  # stop each epoch after this many steps (0: the whole epoch); for tests

    def model_config(self) -> ModelConfig:
        v1 = self.version == "v1"
        return ModelConfig(
            arch=self.arch,
            small_stem=self.use_small_stem,
            dim=self.moco_dim,
            K=self.moco_k,
            m=self.moco_m,
            T=self.moco_t if self.moco_t is not None else (0.07 if v1 else 0.2),
            mlp=not v1,
            symmetric=self.symmetric,
            bn_splits=self.bn_splits,
            sync_bn=self.sync_bn,
        )

    @property
    def use_small_stem(self) -> bool:
        return self.small_stem if self.small_stem is not None else self.image_size <= 96

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 0.03 * self.batch_size / 256


def check_config(cfg: TrainConfig, num_images: int, world: int = 1) -> TrainConfig:
    """Refuse impossible settings, warn about poor ones, and fix them when ``adapt`` is set."""
    check_arch(cfg.arch)
    if cfg.version not in ("v1", "v2"):
        raise ValueError(f"Unknown MoCo version {cfg.version!r}; valid: v1, v2")
    if num_images == 0:
        raise ValueError(
            f"No images found in {cfg.data} (looked for jpg, png, webp, bmp, tif, gif)"
        )
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by {world} processes")
    changes: dict[str, Any] = {}
    if cfg.batch_size > num_images:
        msg = f"batch size {cfg.batch_size} exceeds the {num_images} images"
        if not cfg.adapt:
            raise ValueError(msg + "; pass a smaller --batch-size or --adapt")
        changes["batch_size"] = max(world, num_images - num_images % world)
        log.warning("%s: batch size set to %d", msg, changes["batch_size"])
    batch = changes.get("batch_size", cfg.batch_size)
    if cfg.moco_k > num_images // 4:
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
            log.warning("%s; K set to %d", msg, k)
        else:
            log.warning("%s; consider --moco-k %d (or --adapt)", msg, k)
    total_steps = cfg.epochs * max(num_images // batch, 1)
    if 1.0 / (1.0 - cfg.moco_m) > total_steps / 10:
        # The key encoder averages the query encoder over ~1/(1-m) steps; when that is a large part
        # of the run the keys stay close to the random initial network and training stalls.
        m = min(cfg.moco_m, max(0.9, 1.0 - 10.0 / total_steps))
        msg = (
            f"momentum m={cfg.moco_m} averages the key encoder over {1 / (1 - cfg.moco_m):.0f} "
            f"steps, too many for a run of {total_steps} steps"
        )
        if cfg.adapt:
            changes["moco_m"] = round(m, 4)
            log.warning("%s; m set to %.4f", msg, m)
        else:
            log.warning("%s; consider --moco-m %.3g (or --adapt)", msg, m)
    if cfg.lr is not None:
        scaled = 0.03 * batch / 256
        if not 0.5 <= cfg.lr / scaled <= 2.0:
            msg = f"lr {cfg.lr} is far from 0.03 x batch/256 = {scaled:.4g} (linear scaling rule)"
            if cfg.adapt:
                changes["lr"] = scaled
                log.warning("%s; lr set to %.4g", msg, scaled)
            else:
                log.warning(msg)
    if cfg.bn_splits > 1 and (batch // world) % cfg.bn_splits:
        log.warning(
            "batch per process %d is not divisible by --bn-splits %d: plain BatchNorm is used",
            batch // world,
            cfg.bn_splits,
        )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cache_images(paths: list[Path], size: int) -> list[Any]:
    """Decode every image once, downscaled to about ``size`` px: augmentations then cost no
    decoding, which otherwise starves the model on small images."""
    from moco.data import ImageError, load_image

    out: list[Any] = []
    for p in paths:
        try:
            im = load_image(p, draft_size=size)
            if min(im.size) > size:
                im.thumbnail((size * im.width // min(im.size), size * im.height // min(im.size)))
            out.append(im)
        except ImageError as e:
            log.warning("skipping %s: %s", p, e)
            out.append(None)
    return out


class _CachedImages(ImageFiles):
    def __init__(self, images: list[Any], transform: Any) -> None:
        super().__init__([Path()] * len(images), transform)
        self.images = images

    def __getitem__(self, i: int) -> tuple[Any, int]:
        im = self.images[i]
        return (None if im is None else self.transform(im)), i


def make_dataset(cfg: TrainConfig, paths: list[Path]) -> ImageFiles:
    transform = TwoCropsTransform(moco_transform(cfg.image_size, cfg.version))
    use_cache = cfg.cache == "on" or (
        cfg.cache == "auto" and len(paths) * (2 * cfg.image_size) ** 2 * 3 < 2 * 2**30
    )
    if use_cache:
        t0 = time.perf_counter()
        images = _cache_images(paths, 2 * cfg.image_size)
        log.info("decoded %d images into memory in %.1fs", len(images), time.perf_counter() - t0)
        return _CachedImages(images, transform)
    return ImageFiles(paths, transform)


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


def train(cfg: TrainConfig) -> Path:
    """Pretrain MoCo as ``cfg`` says; return the path of the last checkpoint."""
    rank, world, local_rank = _init_distributed()
    paths = list_images(cfg.data)
    cfg = check_config(cfg, len(paths), world)
    out = Path(cfg.out)
    ckpt_path = out / LAST
    start_epoch, skip_steps, resumed = 0, 0, None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        resumed = load_checkpoint_file(ckpt_path)
        start_epoch, skip_steps = int(resumed["epoch"]), int(resumed.get("step", 0))
    elif ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")

    _seed_all(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = _device(cfg, local_rank)
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
    steps_per_epoch = len(paths) // cfg.batch_size
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)

    def payload(epoch: int, step: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "config": {**dataclasses.asdict(cfg), "model": dataclasses.asdict(model.cfg)},
            "rng": rng_state(),
        }

    epoch = completed = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # Each epoch reproducible on its own; ranks differ (augmentations with workers=0).
            _seed_all(cfg.seed * 1_000_003 + epoch + 7919 * rank)
            skip = skip_steps if epoch == start_epoch else 0
            if resumed is not None and skip and "rng" in resumed:
                set_rng_state(resumed["rng"])  # mid-epoch (Ctrl-C): continue the interrupted RNG
            idx = _shard(len(paths), epoch, cfg, rank, world, skip * (cfg.batch_size // world))
            loader = _loader(dataset, idx, cfg, world, epoch, rank)
            stats = _train_one_epoch(
                step_fn,
                model,
                optimizer,
                loader,
                cfg,
                epoch,
                steps_per_epoch,
                skip,
                device,
                amp,
                runlog,
            )
            completed = epoch + 1
            if monitor is not None:
                stats["knn_top1"] = monitor(model.encoder_q)
            runlog.epoch_end(epoch, stats)
            if rank == 0:
                save_checkpoint(ckpt_path, payload(epoch + 1, 0))
                if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                    save_checkpoint(out / f"checkpoint_{epoch + 1:04d}.pt", payload(epoch + 1, 0))
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


def _train_one_epoch(
    step_fn: nn.Module,
    model: MoCo,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: TrainConfig,
    epoch: int,
    steps: int,
    skip: int,
    device: torch.device,
    amp: bool,
    runlog: RunLog,
) -> dict[str, float]:
    model.train()
    milestones = step_milestones(cfg.epochs)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    loss_sum, acc_sum, n_seen, n_steps = 0.0, 0.0, 0, 0
    t0 = time.perf_counter()
    bar = runlog.progress(epoch, total=steps, initial=skip)
    step = skip
    try:
        for im_q, im_k, ids in _batches(loader, runlog, device):
            if step >= steps:
                break
            frac = epoch + step / max(steps, 1)
            lr = (
                step_lr(cfg.base_lr, frac, milestones)
                if cfg.version == "v1"
                else cosine_lr(cfg.base_lr, frac, cfg.epochs, cfg.warmup_epochs)
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            im_q = im_q.to(device, non_blocking=True, memory_format=fmt)
            im_k = im_k.to(device, non_blocking=True, memory_format=fmt)
            ids = ids.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, logits, labels = step_fn(im_q, im_k, ids)
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
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", acc=f"{acc:.0f}", img_s=f"{n_seen / elapsed:.0f}"
            )
            runlog.step(epoch * steps + step, loss.item(), lr)
    except KeyboardInterrupt as e:
        e.step = step  # type: ignore[attr-defined]
        raise
    finally:
        bar.close()
    world = dist.get_world_size() if dist.is_initialized() else 1
    seconds = time.perf_counter() - t0
    return {
        "loss": loss_sum / max(n_seen, 1),
        "lr": lr if n_steps else float("nan"),
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
