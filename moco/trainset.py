"""What a pretraining run trains on: the images (decoded once into a store), their two views,
the held-out images of the label-free monitor, and each epoch's batches on each rank."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from moco.augment import TwoCropsTransform, moco_transform
from moco.batchaug import BatchAugment
from moco.config import TrainConfig
from moco.data import ImageError, ImageFiles, collate_skip, load_image
from moco.distributed import world_size
from moco.imagestore import ImageStore, StoreError, default_root, open_store, store_dir, store_side
from moco.monitor import ViewMonitor

if TYPE_CHECKING:
    from moco.trainlog import RunLog

log = logging.getLogger(__name__)


def cache_images(paths: list[Path], size: int) -> list[Any]:
    """Decode every image once, downscaled to about ``size`` px: augmentations then cost no
    decoding, which otherwise starves the model on small images."""
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


class CachedImages(ImageFiles):
    def __init__(self, images: list[Any], transform: Any) -> None:
        super().__init__([Path()] * len(images), transform)
        self.images = images

    def __getitem__(self, i: int) -> tuple[Any, int]:
        im = self.images[i]
        return (None if im is None else self.transform(im)), i


def view_transform(cfg: TrainConfig) -> Any:
    """The augmentation of one view, as ``cfg`` sets it."""
    return moco_transform(
        cfg.image_size,
        cfg.version,
        blur=cfg.blur,
        crop_min=cfg.crop_min if cfg.crop_min is not None else 0.2,
        color=cfg.color if cfg.color is not None else 1.0,
    )


BATCHED_CPU_MAX = 96
"""``--augment auto`` on CPU: batched up to this size, PIL workers above. Measured on 2 cores
(bench/results/bench_pretrain_20261202_150200_cpu.json, end to end over compute only): 32 px
batched 97 img/s against PIL 73; 64 px 0.93x against 0.92x; 224 px 0.88x against 0.94x, where
the workers' processes overlap the step and the batched ops, in the training process, do not.
With bf16 autocast on a CPU with bf16 units the step is 2.4x faster and the workers compete
with it for the same cores: batched wins at every size there (224 px: 0.74x against 0.62x;
bench/results/bench_pretrain_20261205_103041_cpu.json)."""


def batched(cfg: TrainConfig, device: str = "cpu") -> bool:
    """Whether views are augmented a batch at a time on the device (else per image, PIL)."""
    if cfg.augment != "auto":
        return cfg.augment == "batch"
    return (
        device != "cpu" or cfg.image_size <= BATCHED_CPU_MAX or bool(cfg.amp) or cfg.local_crops > 0
    )


def make_dataset(
    cfg: TrainConfig, paths: list[Path], device: str = "cpu"
) -> ImageFiles | ImageStore:
    """The training images: the decoded image store for batched augmentation (``batched``),
    else decoded PIL images in memory or the files read anew each epoch.

    When the store cannot be written (read-only cache folder, full disk), ``--augment auto``
    says why and trains from the files; ``--augment batch`` (and multi-crop) stop with the error.
    """
    if batched(cfg, device):
        side = store_side(cfg.image_size)
        root = Path(cfg.store_dir) if cfg.store_dir else default_root()
        try:
            return open_store(paths, side, store_dir(root, cfg.data, side), cfg.workers)
        except StoreError as e:
            if cfg.augment == "batch" or cfg.local_crops:
                raise StoreError(f"the decoded image store {e}; pass --store-dir DIR") from e
            log.warning("no decoded image store (%s): augmenting per image instead", e)
    transform = TwoCropsTransform(view_transform(cfg))
    if not in_memory(cfg, len(paths)):
        return ImageFiles(paths, transform)
    t0 = time.perf_counter()
    images = cache_images(paths, 2 * cfg.image_size)
    decoded = sum(im is not None for im in images)
    log.info("decoded %d images into memory in %.1fs", decoded, time.perf_counter() - t0)
    return CachedImages(images, transform)


def readable_images(dataset: ImageFiles | ImageStore) -> int | None:
    """How many of the dataset's files decoded, where it decoded them all up front (the store,
    images in memory); None for files read as each epoch goes."""
    if isinstance(dataset, ImageStore):
        return int(dataset.valid.sum())
    if isinstance(dataset, CachedImages):
        return sum(im is not None for im in dataset.images)
    return None


def in_memory(cfg: TrainConfig, n: int) -> bool:
    """PIL path: ``--cache on``, or ``auto`` when ``n`` images at twice the training size fit
    in 2 GiB."""
    fits = n * (2 * cfg.image_size) ** 2 * 3 < 2 * 2**30
    return cfg.cache == "on" or (cfg.cache == "auto" and fits)


class StoreBatches:
    """An epoch's batches of an ``ImageStore``, every view augmented on ``device`` at once.

    Yields what the PIL loader's ``collate_skip`` does: ([view_q, view_k, *local views], ids,
    broken ids): after the two global views, one view of each of ``extra`` (multi-crop's local
    augmentation, once per local crop).
    The augmentations of batch ``b`` come from a generator seeded by (``seed``, ``b``), so a run
    resumed mid-epoch draws exactly what it would have.
    """

    def __init__(
        self,
        store: ImageStore,
        idx: list[int],
        batch_size: int,
        augment: BatchAugment,
        device: torch.device,
        seed: int,
        first_batch: int = 0,
        extra: tuple[BatchAugment, ...] = (),
    ) -> None:
        self.store, self.idx, self.batch_size = store, idx, batch_size
        self.augment, self.device, self.seed, self.first_batch = augment, device, seed, first_batch
        self.extra = extra

    def __len__(self) -> int:
        return len(self.idx) // self.batch_size

    def _read(self, b: int) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """Batch ``b``'s good ids, broken ids and uint8 canvases (pinned for a CUDA copy)."""
        ids = torch.tensor(self.idx[b * self.batch_size : (b + 1) * self.batch_size])
        good = self.store.valid[ids]
        bad, ids = ids[~good].tolist(), ids[good]
        pin = self.device.type == "cuda"
        return ids, bad, self.store.gather(ids, pin) if len(ids) else None

    def _views(self, b: int, canvases: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        """Batch ``b``'s views, from a generator seeded by (``seed``, ``b``) alone."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.first_batch + b)
        images = canvases.to(self.device, non_blocking=True)
        sizes = self.store.sizes[ids].to(self.device)
        views = [self.augment(images, sizes, g), self.augment(images, sizes, g)]
        return views + [aug(images, sizes, g) for aug in self.extra]

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor, list[int]]]:
        # The next batch's canvases are read in a thread while this one trains (page faults and
        # torch ops release the GIL); the views are drawn here, in the training thread, with all
        # of torch's threads. On a CPU, drawing them in the reader beside the step measured
        # slower than taking turns (end to end 0.84x against 0.89x of the step alone at 64 px
        # on 2 cores, docs/pretraining.md): the two threads' pools fight for the same cores.
        # Each batch's draws depend on (seed, b) only.
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead = reader.submit(self._read, 0) if len(self) else None
            for b in range(len(self)):
                assert ahead is not None
                ids, bad, canvases = ahead.result()
                ahead = reader.submit(self._read, b + 1) if b + 1 < len(self) else None
                views = None if canvases is None else self._views(b, canvases, ids)
                yield views, ids, bad


LOCAL_CROP_MIN = 0.05
"""The smallest local crop (SwAV: local crops 0.05-0.14 of the area, global ones 0.14-1)."""


FUSE_MIN_STEPS = 2000
"""CPU runs planned this long (or ``--minutes`` 5 and more) fuse their augmentation: two views
then cost 0.35-0.7x, which repays the compiling once torch's inductor cache holds the stages
(3 s). The first run on a machine compiles from scratch (25-30 s): at 32 px, batch 128, where
fusing saves 9 ms a step, a 5-minute run loses ~15 s to it (docs/pretraining.md)."""


def fuse_augment(cfg: TrainConfig, steps_per_epoch: int, device: torch.device) -> bool:
    """Whether a run's batched augmentation is compiled (``BatchAugment.fused``): on CPU, where
    it was measured to pay, for runs long enough to repay the compiling; never on GPUs
    (unmeasured there: ``bench/bench_pretrain.py --device cuda`` times both)."""
    if device.type != "cpu":
        return False
    steps = cfg.total_steps or cfg.epochs * steps_per_epoch
    return cfg.minutes >= 5 or (cfg.minutes == 0 and steps >= FUSE_MIN_STEPS)


def batch_augment(cfg: TrainConfig, local: bool = False, fused: bool = False) -> BatchAugment:
    """The batched twin of ``view_transform``: the same recipe, on tensors.

    ``local``: multi-crop's small views instead, at ``local_size`` px from crops between
    ``LOCAL_CROP_MIN`` and the global views' smallest crop, so the two scales do not overlap.
    ``fused``: compile its elementwise stages (``fuse_augment`` decides for a run).
    The views come in the dtype and layout the model takes: bf16 under autocast (``amp``),
    channels last for a channels-last model (``BatchAugment.dtype``).
    """
    crop_min = cfg.crop_min if cfg.crop_min is not None else 0.2
    size, low, high = cfg.image_size, crop_min, 1.0
    if local:
        size, low, high = local_size(cfg), min(LOCAL_CROP_MIN, crop_min), crop_min
    return BatchAugment(
        size,
        cfg.version,
        crop_min=low,
        crop_max=high,
        color=cfg.color if cfg.color is not None else 1.0,
        blur=cfg.blur,
        fused=fused,
        dtype=torch.bfloat16 if cfg.amp else torch.float32,
        channels_last=cfg.channels_last,
    )


def local_size(cfg: TrainConfig) -> int:
    return cfg.local_size or max(cfg.image_size // 2, 8)


def holdout(paths: list[Path], cfg: TrainConfig) -> tuple[list[Path], list[Path], bool]:
    """Training paths, the label-free monitor's images, and whether those are held out.

    Folders of 500 images or more give up to ``monitor_images`` (at most a tenth) to the
    monitor; smaller ones are too precious, and the monitor samples training images instead.
    """
    n = min(cfg.monitor_images, len(paths) // 10)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    order = torch.randperm(len(paths), generator=g).tolist()
    if cfg.monitor_images <= 0:
        return paths, [], False
    if len(paths) < 500:
        chosen = sorted(order[: min(cfg.monitor_images, len(paths))])
        return paths, [paths[i] for i in chosen], False
    held = set(order[:n])
    train_paths = [p for i, p in enumerate(paths) if i not in held]
    return train_paths, [paths[i] for i in sorted(held)], True


def view_monitor(cfg: TrainConfig, paths: list[Path]) -> ViewMonitor | None:
    images = [im for im in cache_images(paths, 2 * (cfg.image_size or 64)) if im is not None]
    return ViewMonitor(images, view_transform(cfg), seed=cfg.seed) if len(images) >= 2 else None


def shard(n: int, epoch: int, cfg: TrainConfig, rank: int, world: int, skip: int) -> list[int]:
    """This rank's indexes for ``epoch``: one seeded permutation shared by all ranks.

    ``skip`` indexes are dropped from the front (the steps an interrupted epoch already did).
    """
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = (n // cfg.batch_size) * cfg.batch_size // world
    return perm[rank::world][:per_rank][skip:]


def loader(
    ds: ImageFiles | ImageStore,
    idx: list[int],
    cfg: TrainConfig,
    world: int,
    epoch: int,
    rank: int = 0,
    device: torch.device | None = None,
    first_batch: int = 0,
    fused: bool | None = None,
) -> DataLoader | StoreBatches:
    """The epoch's batches of ``ds[idx]``, in order, each rank's augmentations its own.

    ``first_batch``: how many of the epoch's batches ``idx`` already lacks (a resumed epoch).
    ``fused``: compile the batched augmentation (None: ``fuse_augment`` decides).
    """
    seed = cfg.seed * 7919 + epoch + 1_000_003 * rank
    if isinstance(ds, ImageStore):
        dev = device or torch.device("cpu")
        if fused is None:
            fused = fuse_augment(cfg, len(ds) // cfg.batch_size, dev)
        return StoreBatches(
            ds,
            idx,
            cfg.batch_size // world,
            batch_augment(cfg, fused=fused),
            dev,
            seed,
            first_batch,
            extra=(batch_augment(cfg, local=True, fused=fused),) * cfg.local_crops,
        )
    g = torch.Generator().manual_seed(seed)
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


def batches(
    loader: DataLoader, runlog: RunLog, device: torch.device
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """The views (query, key, then any local ones) and the dataset indexes of each batch's good
    images; logs broken files."""
    world = world_size()
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
            yield [v[:n] for v in views], ids[:n]
