"""``TrainConfig``: every ``pretrain`` setting, in a module that does not import torch.

``moco-search --help`` builds the ``pretrain`` flags from these fields (one flag per field, so
the CLI cannot drift from the library), and must answer before torch would have loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moco.model import ModelConfig

BN_SPLITS = 8
"""Key-encoder BatchNorm groups by default: shuffle-BN emulated on one device, as the official
CIFAR demo (fewer on small batches: ``recipe.auto_splits``)."""

ADAPT_HELP = (
    "fit a setting that would train poorly on this folder (a batch larger than the images, a "
    "queue over a quarter of them, an lr far from the scaling rule, a momentum too slow for the "
    "run) instead of only warning; the changes are logged in one line"
)
"""The one description of ``--adapt`` (its help text; the README and docs point here)."""

MECHANISMS = ("moco", "end-to-end", "memory-bank")
"""Where a query's keys come from (``--mechanism``; moco.mechanisms, docs/mechanisms.md)."""

QUEUE_ONLY = ("local_crops", "exclude_nearest")
"""Options only MoCo's queue of keys supports: refused with the other mechanisms."""


def queue_only_flags(cfg: Any) -> list[str]:
    """The ``QUEUE_ONLY`` options that ``cfg`` turns on, as their flags."""
    return [f"--{name.replace('_', '-')}" for name in QUEUE_ONLY if getattr(cfg, name)]


KNN_K, KNN_T = 200, 0.1
"""The weighted kNN classifier's neighbours and temperature (the official CIFAR demo's), for the
pretraining monitor, ``eval``, the probe commands and the UI alike."""


@dataclass(frozen=True)
class TrainConfig:
    """Every field is a ``pretrain`` flag; ``None`` means chosen by ``moco.recipe.auto_config``."""

    data: str
    out: str
    version: str = "v2"
    mechanism: str = "moco"  # where keys come from: moco, end-to-end, memory-bank
    arch: str = "resnet18"
    small_stem: bool | None = None  # None: on when image_size <= 96, except on CPU
    image_size: int | None = None  # None: 32 on CPU, 224 on GPU
    embed_size: int | None = None  # what export embeds at; None: image_size
    epochs: int = 200
    minutes: float = 0.0  # > 0: train for this long; the epochs are then chosen by the run
    batch_size: int | None = None  # None: 128 on CPU, 256 on GPU (at most images / 8)
    lr: float | None = None  # None: moco.recipe.LR_PER_256 * batch_size / 256
    weight_decay: float | None = None  # None: 5e-4 on images <= 96 px, else the paper's 1e-4
    warmup_epochs: float | None = None  # None: 0, or 5% of the run with --minutes
    moco_dim: int = 128
    moco_k: int | None = None  # None: a tenth of the images
    moco_m: float | None = None  # None: 0.99 (lowered to fit a short run by the "fit" m_schedule)
    m_schedule: str = "fit"  # fit: m <= 1 - 10/steps; cosine: m rises to 1; constant: the paper's
    moco_t: float | None = None  # None: 0.1 for new v2 runs <= 96 px; else 0.07 v1, 0.2 v2
    bank_t: float = 0.5  # memory-bank: v <- t * v + (1 - t) * q (InstDisc's t)
    mlp: bool | None = None  # None: the version's head (v2 MLP, v1 linear)
    head_bn: bool = False
    symmetric: bool = False
    exclude_nearest: int = 0  # the n queued keys nearest a query's key are not its negatives
    crop_min: float | None = None  # None: 0.2, the papers'
    color: float | None = None  # None: 1, the papers' colour jitter and grayscale
    blur: bool = True  # v2's Gaussian blur
    local_crops: int = 0  # multi-crop: small views per image, extra queries against the key
    local_size: int | None = None  # None: half of image_size
    bn_splits: int | None = None  # None: 8 groups of at least 4 images per process; 1: off
    sync_bn: bool = False
    adapt: bool = False  # see ADAPT_HELP
    workers: int = 2
    cache: str = "auto"  # --augment pil: pre-decoded images in memory: auto | on | off
    augment: str = "auto"  # batch: from the image store, on the device; pil: per image; auto
    store_dir: str | None = None  # None: moco.imagestore.default_root()
    seed: int = 0
    deterministic: bool = False
    resume: bool = False
    init_from: str | None = None
    val_dir: str | None = None
    knn_k: int = KNN_K
    knn_t: float = KNN_T
    monitor_images: int = 256  # held-out images of the label-free monitor (0: off)
    device: str | None = None
    amp: bool | None = None  # None: bf16 autocast on CUDA, and on CPUs with bf16 units >= 48 px
    channels_last: bool = True
    compile: bool = False
    save_every: int = 0  # also keep checkpoint_NNNN.pt every N epochs (0: only the last)
    save_minutes: float = 0.0  # also keep checkpoint_NNNN.pt every M minutes (0: off)
    max_steps: int = 0  # stop each epoch after this many steps (0: the whole epoch); for tests
    total_steps: int = 0  # length of the schedule in steps (0: epochs); --minutes sets it

    def model_config(self, num_images: int = 0) -> ModelConfig:
        """The model's settings; ``num_images`` sizes the memory bank (one entry per image)."""
        from moco.model import ModelConfig

        v1 = self.version == "v1"
        return ModelConfig(
            arch=self.arch,
            small_stem=self.use_small_stem,
            dim=self.moco_dim,
            K=self.moco_k if self.moco_k is not None else 65536,
            m=self.moco_m if self.moco_m is not None else 0.999,
            T=self.moco_t if self.moco_t is not None else (0.07 if v1 else 0.2),
            mlp=self.mlp if self.mlp is not None else not v1,
            symmetric=self.symmetric,
            bn_splits=self.bn_splits if self.bn_splits is not None else BN_SPLITS,
            sync_bn=self.sync_bn,
            head_bn=self.head_bn,
            exclude_nearest=self.exclude_nearest,
            mechanism=self.mechanism,
            bank_size=num_images if self.mechanism == "memory-bank" else 0,
            bank_t=self.bank_t,
        )

    @property
    def use_small_stem(self) -> bool:
        if self.small_stem is not None:
            return self.small_stem
        return self.image_size is not None and self.image_size <= 96

    @property
    def base_lr(self) -> float:
        batch = self.batch_size or 256
        return self.lr if self.lr is not None else 0.03 * batch / 256


FIXED_ON_RESUME = (
    "version",
    "mechanism",
    "arch",
    "small_stem",
    "moco_dim",
    "moco_k",
    "mlp",
    "head_bn",
)
"""Settings a run cannot change half-way: they shape the weights, the head or the queue."""


def resume_config(
    given: TrainConfig, stored: dict[str, Any], flags: Collection[str] | None = None
) -> tuple[TrainConfig, dict]:
    """The config a ``--resume`` continues with: the run's own, as its checkpoint saved it,
    with the flags given now on top: ``flags`` names them (the command line's), else those
    not at their default count as given.

    DATA and ``--out`` are enough to resume (``pretrain DATA --out RUN --resume``); a flag
    given beside them overrides the saved value and is reported in the returned
    ``{field: (saved, now)}``; one in ``FIXED_ON_RESUME`` that differs is refused. A run planned
    by ``--minutes`` keeps its planned schedule unless ``--epochs`` is given anew.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in stored.items() if k in names}
    defaults = TrainConfig(data=given.data, out=given.out)
    now = {
        k: getattr(given, k)
        for k in names - {"data", "out", "resume"}
        if (k in flags if flags is not None else getattr(given, k) != getattr(defaults, k))
    }
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    for k in FIXED_ON_RESUME:
        if k in changed:
            flag = "--" + k.replace("_", "-")
            raise ValueError(
                f"{flag} cannot change when resuming: the run in {given.out} has "
                f"{changed[k][0]!r}, not {changed[k][1]!r} (start a new --out for that)"
            )
    if now.get("minutes", 0) > 0 and not saved.get("minutes", 0) > 0:
        # A run trained by --epochs has no clock to plan from: taken as a --minutes run saved
        # before it planned, it was started again, its checkpoint and log overwritten.
        raise ValueError(
            f"--minutes cannot be given to resume the run in {given.out}: it was trained by "
            f"--epochs ({saved.get('epochs')}). Give --epochs N (more than the epochs done) to "
            "train it on, or start a new --out for a run of a set time"
        )
    merged = {**saved, **now, "data": given.data, "out": given.out, "resume": True}
    if "epochs" in changed and "total_steps" not in now:  # a new length: plan it from epochs
        merged.update(total_steps=0, minutes=0.0)
    return TrainConfig(**merged), changed
