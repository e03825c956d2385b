"""Files -> L2-normalised embeddings: parallel decoding, batched channels-last inference.

Indexing and querying share ``prepare`` so an indexed image and the same image given as a query
see identical pixels (JPEG draft mode included) and land on the same vector. Each file is read
once: the bytes are hashed and decoded from memory. Decoding runs in DataLoader worker processes;
inference runs under ``torch.inference_mode`` with channels-last memory, which the CPU and GPU
convolution kernels prefer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import moco
from moco import (
    EncoderConfig,
    ImageError,
    decoder_hint,
    eval_transform,
    load_encoder,
    load_image,
    open_image,
)

ORIENTATION = 0x0112
Source = str | os.PathLike | bytes | Image.Image


@dataclass
class Decoded:
    """One file after decoding: a tensor, or ``reason`` why not (then ``tensor`` is None)."""

    tensor: torch.Tensor | None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    reason: str | None = None


def draft_size(cfg: EncoderConfig) -> int:
    """The resize target of ``eval_transform``: JPEG draft decoding may go down to it."""
    return moco.resize_side(cfg)


def read_bytes(path: str) -> bytes:
    """The file's bytes; failures raise ``ImageError`` with the reason the database records
    and the file's name (``Collection.search("typo.jpg")`` says which file is missing)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        reason = "broken symlink" if os.path.islink(path) else "missing file"
        raise ImageError(reason, path) from e
    except PermissionError as e:
        raise ImageError("permission denied", path) from e
    except IsADirectoryError as e:
        raise ImageError("not a file", path) from e
    except OSError as e:
        reason = "symlink loop" if e.errno == errno.ELOOP else "unreadable"
        raise ImageError(reason, path) from e


def prepare(
    source: Source, transform: Callable[[Image.Image], torch.Tensor], draft: int | None
) -> Decoded:
    """Decode and transform one image; header size and format are recorded before draft mode."""
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if name is not None:
        source = read_bytes(name)
    sha = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else None
    try:
        with warnings.catch_warnings():  # load_image below refuses bombs with a reason
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_image(source, draft)
        width, height, fmt = im.size[0], im.size[1], im.format
        if im.getexif().get(ORIENTATION) in (5, 6, 7, 8):
            width, height = height, width  # stored sideways, shown upright
    except Exception:  # let load_image name the reason below
        im, width, height, fmt = source, None, None, None
    try:
        rgb = load_image(im, draft_size=draft)
    except ImageError as e:
        if name is None:
            raise
        # Decoded from the file's bytes: name the file the error is about.
        named = f"{name} ({e.detail})" if e.detail else name
        raise ImageError(e.reason, named + decoder_hint(name)) from e
    return Decoded(transform(rgb), sha, width, height, fmt)


class DecodeFiles(Dataset):
    """Decoded files by position; a broken file yields ``Decoded(None, reason=...)``."""

    def __init__(self, paths: list[str], cfg: EncoderConfig) -> None:
        self.paths = paths
        self.transform = eval_transform(cfg)
        self.draft = draft_size(cfg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        try:
            return prepare(self.paths[i], self.transform, self.draft)
        except ImageError as e:
            return Decoded(None, reason=e.reason)


def _keep(batch: list[Decoded]) -> list[Decoded]:
    return batch


def decode_batches(
    paths: list[str], cfg: EncoderConfig, batch_size: int, workers: int
) -> Iterator[list[Decoded]]:
    """Decoded files in order, ``batch_size`` at a time, decoded by ``workers`` processes."""
    loader = DataLoader(
        DecodeFiles(paths, cfg),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=4 if workers else None,
    )
    yield from loader


def load_model(
    encoder_dir: str | os.PathLike, device: str
) -> tuple[torch.nn.Module, EncoderConfig]:
    """The frozen encoder in channels-last memory format on ``device``."""
    model, cfg = load_encoder(Path(encoder_dir), device=device)
    return model.to(memory_format=torch.channels_last), cfg


def embed_tensors(model: torch.nn.Module, x: torch.Tensor, device: str) -> np.ndarray:
    """Features of a batch (N x 3 x H x W) as unit-norm float32 rows (N x D)."""
    with torch.inference_mode():
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        f = model(x)  # N x D
        return F.normalize(f.float(), dim=1).cpu().numpy()


def embed_decoded(model: torch.nn.Module, batch: list[Decoded], device: str) -> np.ndarray:
    """Embeddings of the good items of ``batch`` (in order), N_good x D."""
    good = [d.tensor for d in batch if d.tensor is not None]
    if not good:
        return np.zeros((0, 0), dtype=np.float32)
    return embed_tensors(model, torch.stack(good), device)


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def default_device(device: str | None) -> str:
    """``device``, or this process's GPU, or the CPU (moco's rule, as a string for torch)."""
    return str(moco.default_device(device))


def describe(d: Decoded) -> dict[str, Any]:
    return {"sha256": d.sha256, "width": d.width, "height": d.height, "format": d.format}
