"""Process setup for one device or a ``torchrun`` job, and the collectives MoCo needs.

One place answers "how many processes, which device": the trainer, the model's queue and
``indexes``' distributed embedding all ask here, so they cannot disagree.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in this job: the process group's size once initialised, else torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank() -> int:
    """This process's rank in the job (torchrun's env), also after the group is gone: the
    one process that reports to the user is rank 0."""
    return int(os.environ.get("RANK", "0"))


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group under torchrun (nccl or gloo)."""
    world = world_size()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), world, local_rank()
    return 0, 1, 0


def default_device(device: str | None = None, rank: int | None = None) -> torch.device:
    """``device`` when given, else this process's GPU (by local rank) or the CPU. A given one
    that is no device, or one this machine lacks, is a ``ValueError`` naming ``--device``:
    torch said "Expected one of cpu, cuda, ipu, ..." or "Found no NVIDIA driver" from deep
    inside the first model move."""
    if device:
        try:
            d = torch.device(device)
        except RuntimeError:
            raise ValueError(
                f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)"
            ) from None
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no usable CUDA GPU; use cpu")
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
        if d.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available here; use cpu")
        return d
    if torch.cuda.is_available():
        index = local_rank() if rank is None else rank
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cpu")


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient flows back)."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
