"""An encoder's self-description (``config.json``), read without torch.

An encoder directory holds ``model.safetensors`` and ``config.json``; whoever only needs to know
*which* encoder a collection was built with (``moco-search info``, search by id, the checks that
refuse another encoder's vectors) reads the config alone. This module imports nothing heavier
than ``json``, so those commands answer in a fraction of a second instead of waiting seconds for
torch and torchvision; ``moco.export`` holds everything that touches the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_IMAGE_SIZE = 2048
"""The largest side an encoder trains or embeds at (224 in the paper): 100,000 was taken, and
the run grew to gigabytes decoding its store before the kernel killed it."""

WEIGHTS, CONFIG = "model.safetensors", "config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint or encoder that cannot be used, with the reason in the message."""


@dataclass(frozen=True)
class EncoderConfig:
    arch: str
    small_stem: bool = False
    feature_dim: int = 512
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    pooling: str = "avg"
    fit: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    source: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def encoder_dir(path: str | os.PathLike) -> Path:
    """``path``, or the encoder directory of its own file (``model.safetensors``,
    ``config.json``): a user who points at the weights means the encoder."""
    path = Path(path)
    if path.name in (WEIGHTS, CONFIG) and (path.parent / CONFIG).is_file():
        return path.parent
    return path


def not_an_encoder(path: Path) -> str:
    """What ``path`` (no ``config.json``) is instead of an encoder, and what to do: a run's
    checkpoint, or a collection, given for the encoder, as newcomers do."""
    if path.is_file() and path.suffix == ".pt":
        return (
            f"{path} is a training checkpoint, not an encoder: export it first (moco-search "
            f"export {path} --out {path.parent / 'encoder'})"
        )
    if (path / "manifest.json").is_file():  # indexes' file; its name is all moco knows of it
        return (
            f"{path} is a collection, not an encoder: moco-search info --collection {path} "
            "names the encoder it was built with"
        )
    return f"Not an encoder directory (no {CONFIG}): {path}"


def read_encoder_config(path: str | os.PathLike) -> EncoderConfig:
    """The config of the encoder directory ``path``, without loading its weights."""
    path = encoder_dir(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(not_an_encoder(path))
    try:
        data = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"Unreadable encoder config {path / CONFIG}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(
            f"Unreadable encoder config {path / CONFIG}: a JSON object with 'arch' expected, "
            f"found a JSON {type(data).__name__}"
        )
    if "moco_k" in data:  # a run's TrainConfig: it also names an 'arch'
        ckpt = path / "checkpoint_last.pt"
        raise CheckpointError(
            f"{path} is a pretraining run, not an encoder: export its encoder first "
            f"(moco-search export {ckpt} --out {path / 'encoder'})"
        )
    try:
        return EncoderConfig.from_dict(data)
    except (TypeError, ValueError) as e:  # a missing 'arch', a mean that is not a list
        raise CheckpointError(f"Unreadable encoder config {path / CONFIG}: {e}") from e


def describe_fit(fit: dict[str, object], code: bool = False) -> str:
    """An encoder's fit (``EncoderConfig.fit``) in words: "centred on 1594 files of /pics".
    Files, not images: a collection indexes one of each set of identical files, so the demo's
    1,593 images were fitted on 1,594 files. ``code`` puts the folder in Markdown backticks."""
    verb = {"center": "centred", "whiten": "whitened"}.get(str(fit.get("kind")), fit.get("kind"))
    folder = f"`{fit.get('folder')}`" if code else fit.get("folder")
    return f"{verb} on {fit.get('images')} files of {folder}"
