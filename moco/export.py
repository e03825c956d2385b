"""Frozen, self-describing encoders: a safetensors file beside a JSON config.

An encoder directory holds ``model.safetensors`` (the query-encoder backbone, head removed) and
``config.json`` (arch, stem, feature dim and the preprocessing it was trained with, as timm's
pretrained config). Whoever loads it (indexing, search, probes) rebuilds the transform from the
config and never guesses. ``content_hash`` (SHA-256 of the weights file) names the encoder, so a
collection can refuse vectors from another one.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and primitive types only.
Besides this project's own training checkpoints, the official facebookresearch/moco (v1/v2,
``module.encoder_q.*``) and moco-v3 (``module.base_encoder.*``) ResNet checkpoints are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from moco import whiten
from moco.data import ENCODER_FILES, RUN_FILES
from moco.encoder_config import (
    CONFIG,
    MAX_IMAGE_SIZE,
    WEIGHTS,
    CheckpointError,
    EncoderConfig,
    encoder_dir,
    read_encoder_config,
)
from moco.encoders import (
    build_encoder,
    default_pooling,
    feature_dim,
    pooled_dim,
    with_pooling,
)
from moco.files import atomic_file, file_hash, output_folder_for
from moco.trainlog import read_log, thin_log

log = logging.getLogger(__name__)


sha256_file = file_hash  # the encoder's content hash


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def save_encoder(
    backbone: nn.Module,
    cfg: EncoderConfig,
    out: str | os.PathLike,
    half: bool = False,
    fitted: dict[str, torch.Tensor] | None = None,
) -> EncoderConfig:
    """Write ``backbone`` (fc removed) and ``cfg`` to the directory ``out``; return the config
    with its ``content_hash`` filled in. ``half`` stores fp16 weights (half the size);
    ``fitted`` is the map of ``whiten.fit_map``, stored in fp32 beside the weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in backbone.state_dict().items()
        if not k.startswith("fc.")
    }
    state |= {whiten.PREFIX + k: v.float().contiguous() for k, v in (fitted or {}).items()}
    with atomic_file(out / WEIGHTS) as tmp:  # a full disk or Ctrl-C leaves no half file
        tmp.write_bytes(save_tensors(state, metadata={"format": "pt"}))
        os.chmod(tmp, 0o644)  # safetensors creates it private; an encoder is meant to be shared
    cfg = dataclasses.replace(cfg, content_hash=sha256_file(out / WEIGHTS))
    _atomic_write_text(out / CONFIG, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return cfg


def load_encoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[nn.Module, EncoderConfig]:
    """The frozen encoder stored at ``path``: eval mode, no gradients, features out.

    Examples:
        >>> model, cfg = load_encoder("models/demo")  # doctest: +SKIP
        >>> feats = model(eval_transform(cfg)(img)[None])  # 1 x cfg.feature_dim
    """
    backbone, fitted, cfg = load_backbone(path, verify=verify)
    try:
        model = whiten.wrap(with_pooling(backbone, cfg.pooling), fitted)
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"Encoder {path} has a pooling or map it cannot apply (pooling={cfg.pooling}, "
            f"map tensors {sorted(fitted)}): {e}"
        ) from e
    model.requires_grad_(False)
    return model.eval().to(device), cfg


def load_backbone(
    path: str | os.PathLike, verify: bool = True
) -> tuple[nn.Module, dict[str, torch.Tensor], EncoderConfig]:
    """The encoder directory's bare backbone (average pool, no map), its map's tensors
    (``whiten.fit_map``'s, empty if none) and its config: what ``load_encoder`` assembles, and
    what ``export_encoder`` starts from to export an encoder again."""
    path = encoder_dir(path)
    cfg = read_encoder_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"Encoder weights missing: {weights}")
    if verify and cfg.content_hash and sha256_file(weights) != cfg.content_hash:
        raise CheckpointError(
            f"Encoder weights {weights} do not match the hash in its config "
            f"({cfg.content_hash[:12]}): the file was changed or is corrupt"
        )
    try:
        tensors = load_file(weights)
    except Exception as e:  # SafetensorError for a truncated or foreign file
        raise CheckpointError(
            f"Unreadable encoder weights {weights}: {e} (truncated or not a safetensors file; "
            "export the encoder again)"
        ) from e
    model = build_encoder(cfg.arch, num_classes=0, small_stem=cfg.small_stem, empty=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    fitted = {k: state.pop(k) for k in list(state) if k.startswith(whiten.PREFIX)}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"Encoder weights {weights} do not fit its config ({cfg.arch}, "
            f"small_stem={cfg.small_stem}): {str(e).splitlines()[0]}"
        ) from e
    return model, fitted, cfg


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)``, with clear errors instead of pickle tracebacks."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing {path}: it holds more than tensors and plain values, and loading it would "
            f"run arbitrary code (torch.load weights_only=True said: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # torch says KeyError '105' for a text file, EOFError for an empty one
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""  # torch adds advice
        said = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(
            f"Unreadable checkpoint {path}: not a PyTorch checkpoint, or a damaged one "
            f"(torch.load said {said})"
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"Unexpected checkpoint content in {path}: {type(ckpt).__name__}")
    return ckpt


_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.")


def _infer_arch(state: dict[str, torch.Tensor]) -> str:
    """ResNet depth from the number of blocks in layer3 and the block type."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer3.")}
    n = max(blocks, default=-1) + 1
    bottleneck = "layer1.0.conv3.weight" in state
    table = {
        (False, 2): "resnet18",
        (False, 6): "resnet34",
        (True, 6): "resnet50",
        (True, 23): "resnet101",
        (True, 36): "resnet152",
    }
    if (bottleneck, n) not in table:
        raise CheckpointError(f"Cannot tell the ResNet depth of this checkpoint ({n} blocks)")
    arch = table[(bottleneck, n)]
    if arch == "resnet50" and state["layer1.0.conv1.weight"].shape[0] == 128:
        arch = "wide_resnet50_2"
    return arch


def backbone_from_checkpoint(
    ckpt: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The query-encoder backbone weights (prefix and head stripped) and what is known of them.

    Returns:
        the state dict for ``build_encoder(arch)`` without ``fc``, and a dict with ``arch``,
        ``small_stem``, ``source`` and, for this project's checkpoints, ``config``.
    """
    raw = ckpt.get("model") or ckpt.get("state_dict") or ckpt
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in raw)), None)
    if prefix is None:
        raise CheckpointError(
            "No MoCo query encoder in this checkpoint: expected keys starting with one of "
            + ", ".join(_PREFIXES)
        )
    state = {
        k[len(prefix) :]: v
        for k, v in raw.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("fc.")
    }
    config = ckpt.get("config", {}) if isinstance(ckpt.get("config"), dict) else {}
    model_cfg = config.get("model", {})
    arch = model_cfg.get("arch") or _infer_arch(state)
    small_stem = bool(model_cfg.get("small_stem", state["conv1.weight"].shape[-1] == 3))
    source = (
        "moco-search"
        if config
        else ("facebookresearch/moco-v3" if "base_encoder" in prefix else "facebookresearch/moco")
    )
    return state, {"arch": arch, "small_stem": small_stem, "source": source, "config": config}


def build_backbone(state: dict[str, torch.Tensor], arch: str, small_stem: bool) -> nn.Module:
    """A backbone with ``state`` loaded; anything but the head missing or extra is an error."""
    model = build_encoder(arch, num_classes=0, small_stem=small_stem)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint does not fit {arch} (small_stem={small_stem}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


FIT_IMAGES = 5000
"""``export`` fits its map on at most this many images of the folder (a fixed-seed sample)."""


def check_encoder_out(out: Path) -> None:
    """Refuse an ``--out`` that holds anything but an encoder: export wrote its two files into a
    run (whose ``config.json`` it replaced), or among photos (which then read as an encoder's
    folder, and their images were passed over by index and pretrain)."""
    if not out.is_dir():
        return
    names = {n for n in os.listdir(out) if not n.endswith(".tmp")}
    others = sorted(names - ENCODER_FILES)
    if not others:
        return
    if names >= RUN_FILES:
        raise ValueError(
            f"--out {out} is a pretraining run: export into a folder of its own, such as "
            f"--out {out / 'encoder'}"
        )
    raise ValueError(
        f"--out {out} holds other files ({others[0]}{', ...' if len(others) > 1 else ''}): "
        "export into a new or empty folder, or an encoder's to replace it"
    )


def export_encoder(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int | None = None,
    half: bool = False,
    pooling: str = "avg",
    fit: str = "none",
    fit_on: str | os.PathLike | None = None,
    fit_images: int = FIT_IMAGES,
) -> EncoderConfig:
    """Write the frozen query-encoder backbone of ``checkpoint`` as an encoder directory.

    ``checkpoint`` is a training checkpoint (ours or official) or an encoder directory, to
    export again with other options (``out`` may be the same directory). It embeds at
    ``image_size``, else at the encoder's size, the run's ``embed_size`` (``pretrain
    --embed-size``; runs of 2026-12-02 to -05 chose 1.5x their training size), or its training
    size (224 for official ones). ``pooling`` is ``with_pooling``'s, or "auto"
    (``default_pooling``); ``fit`` ("center", "whiten" or "auto", see ``moco.whiten``) fits a
    map on up to ``fit_images`` images of the folder ``fit_on`` (default: the run's training
    folder; with none, "auto" exports without a map).
    """
    if image_size is not None and not 8 <= image_size <= MAX_IMAGE_SIZE:  # 0 silently meant
        # the default; 100,000 ran out of memory
        raise ValueError(
            f"--image-size must be from 8 to {MAX_IMAGE_SIZE} pixels, got {image_size}"
        )
    model, cfg, data = _frozen_source(checkpoint)
    check_encoder_out(Path(out))
    with output_folder_for(out):  # made before the fitting, which takes minutes; gone if it fails
        pooling = default_pooling(cfg.arch) if pooling == "auto" else pooling
        cfg = dataclasses.replace(
            cfg,
            image_size=int(image_size if image_size is not None else cfg.image_size),
            pooling=pooling,
            feature_dim=pooled_dim(cfg.arch, pooling),
            fit={},
            content_hash="",
        )
        fitted: dict[str, torch.Tensor] = {}
        fit_on = fit_on or (data if data and Path(data).is_dir() else None)
        if fit == "auto" and fit_on is None:
            fit = "none"
        if fit != "none":
            if fit_on is None:
                raise ValueError(
                    f"--fit {fit} needs a folder of images to fit on: the checkpoint names none "
                    f"that exists here ({data or 'not a moco-search run'}); pass --fit-on DIR"
                )
            fitted, info = fit_on_folder(with_pooling(model, pooling), cfg, fit, fit_on, fit_images)
            cfg = dataclasses.replace(cfg, fit=info)
        return save_encoder(model, cfg, out, half=half, fitted=fitted)


def _frozen_source(
    checkpoint: str | os.PathLike,
) -> tuple[nn.Module, EncoderConfig, str | None]:
    """The bare backbone (no pooling choice, no map) of a checkpoint or encoder directory, the
    config it exports with by default, and the folder it was trained on, if known. An encoder's
    own file stands for its directory (``encoder_dir``): torch.load would read the weights
    alone, without the config that says what they are; a run's folder stands for its last
    checkpoint, which is what ``export RUN`` means."""
    checkpoint = encoder_dir(checkpoint)
    if (checkpoint / "checkpoint_last.pt").is_file() and not (checkpoint / WEIGHTS).is_file():
        checkpoint = checkpoint / "checkpoint_last.pt"
    if checkpoint.is_dir():
        model, _, cfg = load_backbone(checkpoint)
        return model, cfg, cfg.training.get("config", {}).get("data")
    state, meta = backbone_from_checkpoint(load_checkpoint_file(checkpoint))
    model = build_backbone(state, meta["arch"], meta["small_stem"])
    train_cfg = meta["config"]
    ours = bool(train_cfg)
    size = train_cfg.get("embed_size") or train_cfg.get("image_size") or 224
    cfg = EncoderConfig(
        arch=meta["arch"],
        small_stem=meta["small_stem"],
        feature_dim=feature_dim(meta["arch"]),
        image_size=int(size),
        interpolation="bilinear",
        crop_pct=1.0 if ours else 0.875,
        source=meta["source"],
        training=_training_summary(checkpoint) if ours else {},
    )
    return model, cfg, train_cfg.get("data")


def fit_on_folder(
    model: nn.Module, cfg: EncoderConfig, fit: str, folder: str | os.PathLike, n: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``whiten.fit_map`` of ``model``'s features of a fixed-seed sample of ``n`` images of
    ``folder``, and what to record of it in the encoder's config."""
    import numpy as np

    from moco.data import list_images
    from moco.evaluate import extract_features
    from moco.preprocess import eval_transform

    if n < 2:
        raise ValueError(f"--fit-images must be at least 2, got {n}")
    paths = list_images(folder)
    if len(paths) > n:
        paths = [paths[i] for i in sorted(np.random.default_rng(0).permutation(len(paths))[:n])]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("fitting the features (%s) on %d images of %s", fit, len(paths), folder)
    with torch.inference_mode():
        feats, kept = extract_features(
            model.eval().to(device), eval_transform(cfg), paths, device=device, progress="fitting"
        )
    model.cpu()
    if len(kept) < 2:
        raise ValueError(
            f"--fit {fit}: {len(kept)} readable images in {folder}; it needs at least 2 "
            "(--fit none exports without)"
        )
    tensors = whiten.fit_map(torch.from_numpy(feats), fit)
    info = {"kind": whiten.kind(tensors), "images": len(kept)}
    return tensors, info | {"folder": str(Path(folder).resolve())}


def _training_summary(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """What the run directory tells about how the encoder was trained (config, last epoch)."""
    run = Path(checkpoint).parent
    summary: dict[str, Any] = {"checkpoint": Path(checkpoint).name}
    if (run / "config.json").is_file():
        summary["config"] = json.loads((run / "config.json").read_text())
    if (run / "log.jsonl").is_file():
        summary["log"] = thin_log(read_log(run))
    return summary
