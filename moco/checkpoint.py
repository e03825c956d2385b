"""Training checkpoints: written atomically, holding only tensors and primitive values.

A checkpoint is ``{"model", "optimizer", "epoch", "step", "config", "rng"}``: the whole MoCo
module (both encoders, queue and pointer), the SGD momentum buffers, where training stopped, the
``TrainConfig`` as a plain dict (not a pickled object: ``torch.load(weights_only=True)`` reads it),
and the random states needed to continue exactly: rank 0's inside it, every other rank's of a
distributed run beside it (``checkpoint_last.rank<r>.rng.pt``), so that each rank continues its
own random stream after a mid-epoch resume.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco.files import atomic_file

LAST = "checkpoint_last.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    data = io.BytesIO()  # serialised first: torch's writer reports a full disk as a bare
    torch.save(payload, data)  # RuntimeError, Python's write as the OSError (ENOSPC) it is
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.getbuffer())
    return path


def rank_rng_file(ckpt: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` (> 0) keeps its random state beside the checkpoint ``ckpt``."""
    ckpt = Path(ckpt)
    return ckpt.with_name(f"{ckpt.stem}.rank{rank}.rng.pt")


def save_rank_rng(ckpt: str | os.PathLike, rank: int, epoch: int, step: int) -> None:
    """Rank ``rank``'s random state at (``epoch``, ``step``): written without waiting for the
    other ranks, so an interrupt that reaches every rank saves every rank's state."""
    save_checkpoint(rank_rng_file(ckpt, rank), {"epoch": epoch, "step": step, "rng": rng_state()})


def rank_rng(ckpt: str | os.PathLike, rank: int, resumed: dict[str, Any]) -> dict[str, Any] | None:
    """Rank ``rank``'s random state when ``resumed`` (read from ``ckpt``) was saved; None when
    that rank's file is missing, unreadable or from another point of the run."""
    if rank == 0:
        return resumed.get("rng")
    try:
        saved = torch.load(rank_rng_file(ckpt, rank), weights_only=True)
        at = (int(saved["epoch"]), int(saved["step"]))
    except Exception:  # missing, cut short or foreign: the rank reseeds instead
        return None
    return saved["rng"] if at == (int(resumed["epoch"]), int(resumed.get("step", 0))) else None
