"""Linear classifier on frozen features: MoCo's evaluation protocol and a fast everyday preset.

MoCo (https://arxiv.org/abs/1911.05722, sec. 4.1) judges features by a linear layer trained on the
frozen encoder: SGD, lr=30, momentum 0.9, no weight decay, 100 epochs, lr x0.1 at epochs 60 and
80, batch 256, RandomResizedCrop + flip, the backbone in eval mode (``ProbeConfig.paper()`` and
``moco.probe_images``). lr=30 is needed because the pooled features of an unnormalised MoCo
ResNet are small (see docs/evaluation.md); the default preset L2-normalises and standardises the
cached features instead, and then full-batch L-BFGS (a logistic regression, as CLIP's linear
probes) converges in seconds with ordinary settings.

A trained ``LinearProbe`` carries its normalisation statistics, its class names and the content
hash of the encoder whose features it reads; ``load_probe`` refuses it for any other encoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from moco.files import atomic_file
from moco.probe_meta import PROBE_CONFIG, PROBE_WEIGHTS, read_probe_meta

log = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "l2", "standardize", "l2+standardize")
OPTIMIZERS = ("sgd", "lbfgs")


class ProbeMismatchError(ValueError):
    """A saved probe that belongs to another encoder (its features mean something else)."""


@dataclass(frozen=True)
class ProbeConfig:
    """How the linear layer is trained.

    Attributes:
        optimizer: "lbfgs" (full batch; ``epochs`` = iterations) or "sgd" (mini-batches).
        lr: learning rate (L-BFGS step scale; 1 with its line search).
        momentum: SGD momentum.
        weight_decay: L2 penalty on the weights (not the bias).
        epochs: passes over the data for SGD, iterations for L-BFGS.
        milestones: SGD epochs at which the lr is multiplied by ``gamma``.
        gamma: lr factor at each milestone.
        batch_size: SGD mini-batch size.
        normalize: one of ``NORMALIZATIONS``, applied to the features before the layer.
        seed: initialisation and shuffling seed.
    """

    optimizer: str = "lbfgs"
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    epochs: int = 100
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    batch_size: int = 256
    normalize: str = "l2+standardize"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown probe optimizer {self.optimizer!r}; valid: {OPTIMIZERS}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalize {self.normalize!r}; valid: {NORMALIZATIONS}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )

    @classmethod
    def fast(cls) -> ProbeConfig:
        """Normalised cached features, full-batch L-BFGS: seconds for 10k+ images on CPU."""
        return cls()

    @classmethod
    def paper(cls) -> ProbeConfig:
        """Exactly MoCo's linear classification protocol (official main_lincls.py)."""
        return cls(
            optimizer="sgd",
            lr=30.0,
            momentum=0.9,
            weight_decay=0.0,
            epochs=100,
            milestones=(60, 80),
            gamma=0.1,
            batch_size=256,
            normalize="none",
        )

    @classmethod
    def preset(cls, name: str) -> ProbeConfig:
        """``"fast"`` or ``"paper"``."""
        presets = {"fast": cls.fast, "paper": cls.paper}
        if name not in presets:
            raise ValueError(f"Unknown probe preset {name!r}; valid: {sorted(presets)}")
        return presets[name]()


class LinearProbe(nn.Module):
    """``fc(normalise(features))`` with the statistics, class names and encoder hash it needs."""

    def __init__(
        self, dim: int, classes: Sequence[str], normalize: str = "none", encoder_hash: str = ""
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalize {normalize!r}; valid: {NORMALIZATIONS}")
        self.classes = list(classes)
        self.normalize = normalize
        self.encoder_hash = encoder_hash
        self.fc = nn.Linear(dim, len(self.classes))
        self.fc.weight.data.normal_(mean=0.0, std=0.01)  # as main_lincls
        self.fc.bias.data.zero_()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def prepare(self, feats: torch.Tensor) -> torch.Tensor:
        """The features as the linear layer sees them."""
        x = feats.float()
        if "l2" in self.normalize:
            x = F.normalize(x, dim=1)
        if "standardize" in self.normalize:
            x = (x - self.mean) / self.std
        return x

    def fit_statistics(self, feats: torch.Tensor) -> None:
        """Per-dimension mean and std of the (L2-normalised) training features."""
        x = F.normalize(feats.float(), dim=1) if "l2" in self.normalize else feats.float()
        if "standardize" in self.normalize:
            self.mean.copy_(x.mean(0))
            self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.prepare(feats))  # NxC logits

    @torch.inference_mode()
    def predict(
        self, feats: np.ndarray | torch.Tensor, k: int = 5
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` class indexes and their softmax probabilities, each Nxk."""
        x = torch.as_tensor(feats)
        probs = self(x.to(self.fc.weight.device)).softmax(dim=1).cpu()
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return top.indices.numpy(), top.values.numpy()


def encode_labels(
    labels: Sequence[Any], classes: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Class indexes of ``labels`` (names or ints) and the class names (sorted when not given)."""
    arr = np.asarray(labels)
    if classes is None:
        if np.issubdtype(arr.dtype, np.integer):
            classes = [str(i) for i in range(int(arr.max()) + 1 if arr.size else 0)]
            return arr.astype(np.int64), classes
        classes = sorted({str(x) for x in arr})
    classes = list(classes)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64), classes
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(x) for x in arr} - lookup.keys())
    if unknown:
        raise ValueError(f"Labels {unknown[:5]} are not among the classes {classes[:10]}")
    return np.array([lookup[str(x)] for x in arr], dtype=np.int64), classes


def _check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"Probe loss is {loss.item()} at {where}: lower the lr")


def fit_fc(probe: LinearProbe, batches: Callable[[int], Any], cfg: ProbeConfig) -> list[float]:
    """SGD on ``probe.fc`` over ``batches(epoch)`` -> iterable of (features, targets)."""
    opt = torch.optim.SGD(
        probe.fc.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=list(cfg.milestones), gamma=cfg.gamma
    )
    losses = []
    for epoch in range(cfg.epochs):
        total, seen = 0.0, 0
        for x, y in batches(epoch):
            loss = F.cross_entropy(probe(x), y)
            _check_finite(loss, f"epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        sched.step()
        losses.append(total / max(seen, 1))
    assert len(losses) == cfg.epochs and sched.last_epoch == cfg.epochs  # schedule length (DINO)
    return losses


def _fit_lbfgs(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig) -> None:
    """Full-batch multinomial logistic regression with an L2 penalty on the weights."""
    opt = torch.optim.LBFGS(
        probe.fc.parameters(),
        lr=cfg.lr,
        max_iter=cfg.epochs,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )
    xp = probe.prepare(x).detach()

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(probe.fc(xp), y)
        loss = loss + 0.5 * cfg.weight_decay * probe.fc.weight.pow(2).sum()
        _check_finite(loss, "an L-BFGS step")
        loss.backward()
        return loss

    opt.step(closure)


def train_probe(
    features: np.ndarray | torch.Tensor,
    labels: Sequence[Any],
    cfg: ProbeConfig | None = None,
    *,
    classes: Sequence[str] | None = None,
    encoder_hash: str = "",
) -> LinearProbe:
    """A linear classifier trained on cached features.

    Args:
        features: NxD features (raw pooled ones; the probe normalises them as ``cfg`` says).
        labels: N class names, or class indexes into ``classes``.
        cfg: training settings; ``ProbeConfig.fast()`` when None.
        classes: the class names; sorted unique ``labels`` when None.
        encoder_hash: content hash of the encoder that produced ``features``.

    Examples:
        >>> probe = train_probe(feats, ["cat", "dog", ...])  # doctest: +SKIP
        >>> top5, probs = probe.predict(new_feats)
    """
    cfg = cfg or ProbeConfig.fast()
    x = (
        torch.as_tensor(np.asarray(features, dtype=np.float32))
        if isinstance(features, np.ndarray)
        else features.detach().float().cpu()
    )
    y_np, names = encode_labels(labels, classes)
    if x.ndim != 2 or x.shape[0] != len(y_np) or len(y_np) == 0:
        raise ValueError(f"Need NxD features and N labels, got {tuple(x.shape)} and {len(y_np)}")
    y = torch.from_numpy(y_np)
    torch.manual_seed(cfg.seed)
    probe = LinearProbe(x.shape[1], names, normalize=cfg.normalize, encoder_hash=encoder_hash)
    probe.fit_statistics(x)
    if cfg.optimizer == "lbfgs":
        _fit_lbfgs(probe, x, y, cfg)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)

        def batches(epoch: int) -> Any:
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                yield x[idx], y[idx]

        fit_fc(probe, batches, cfg)
    return probe.eval()


def save_probe(
    probe: LinearProbe,
    out: str | os.PathLike,
    *,
    cfg: ProbeConfig | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``probe.safetensors`` + ``probe.json`` (classes, normalisation, encoder hash)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    with atomic_file(out / PROBE_WEIGHTS) as tmp:  # a full disk: OSError (see atomic_file)
        tmp.write_bytes(save_tensors(state))
    meta = {
        "format": "moco-search-probe/1",
        "classes": probe.classes,
        "feature_dim": probe.fc.in_features,
        "normalize": probe.normalize,
        "encoder_hash": probe.encoder_hash,
        "config": dataclasses.asdict(cfg) if cfg else None,
        "metrics": metrics,
    }
    with atomic_file(out / PROBE_CONFIG) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_probe(path: str | os.PathLike, encoder_hash: str | None = None) -> LinearProbe:
    """The probe saved at ``path``; refused when ``encoder_hash`` is given and differs."""
    path = Path(path)
    meta = read_probe_meta(path)
    if encoder_hash is not None and meta["encoder_hash"] != encoder_hash:
        raise ProbeMismatchError(
            f"The probe at {path} was trained on features of encoder "
            f"{meta['encoder_hash'][:12] or '(unknown)'}, not of {encoder_hash[:12]}: its weights "
            "mean nothing for these features; train a new probe for this encoder"
        )
    probe = LinearProbe(
        meta["feature_dim"],
        meta["classes"],
        normalize=meta["normalize"],
        encoder_hash=meta["encoder_hash"],
    )
    probe.load_state_dict(load_file(str(path / PROBE_WEIGHTS)), strict=True)
    return probe.eval()
