"""Indexing with several processes (``torchrun --nproc-per-node N launch.py index ...``).

Rank 0 scans, plans and owns the database; the to-do list is broadcast and rank ``r`` decodes and
embeds items ``r, r+N, r+2N, ...``. In round ``i`` every rank sends its batch ``i`` to rank 0
(``gather_object``), and together those batches are one contiguous stretch of the sorted to-do
list, which rank 0 commits in order. Rows therefore get the same ids as in a one-process run.
Works with gloo on CPU; each rank uses ``cuda:<local rank>`` when GPUs exist.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from indexes import embed, runlock
from indexes.build import (
    FolderOptions,
    IndexReport,
    commit_batch,
    commit_failed,
    finish_run,
    start_run,
)
from indexes.faults import disk_full_reported
from indexes.preflight import check_options
from moco import default_device


def index_distributed(
    roots: list[Path],
    collection: Path,
    encoder: Path | None = None,
    *,
    labels_csv: Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = None,
    index_type: str = "auto",
    allow_empty: bool = False,
    folder_labels: bool = False,
    move_root: tuple[Path, Path] | None = None,
    forget_root: Path | None = None,
) -> IndexReport | None:
    """``index_images`` across the ranks of a torchrun job; rank 0 returns the report."""
    check_options(batch_size, workers)  # on every rank, before any of them waits for another
    device = str(default_device(device))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        with disk_full_reported(collection), ExitStack() as held:
            run, todo, enc = None, [], None
            if rank == 0:
                held.enter_context(runlock.held(collection))
                run = start_run(
                    roots,
                    collection,
                    encoder,
                    labels_csv,
                    index_type=index_type,
                    device=device,
                    options=FolderOptions(allow_empty, folder_labels, move_root, forget_root),
                )
                todo = commit_failed(run)
                enc = run.encoder
            box: list[Any] = [todo, enc]
            dist.broadcast_object_list(box, src=0)
            todo, enc = box
            mine = todo[rank::world]
            rounds = math.ceil(math.ceil(len(todo) / world) / batch_size) if todo else 0
            if rounds:
                model, cfg = embed.load_model(enc, device)
                workers = embed.default_workers() // world if workers is None else workers
                batches = embed.decode_batches([e.path for e, _ in mine], cfg, batch_size, workers)
            for i in range(rounds):
                decoded = next(batches, []) if i * batch_size < len(mine) else []
                vecs = embed.embed_decoded(model, decoded, device) if decoded else None
                payload = [(d.sha256, d.width, d.height, d.format, d.reason) for d in decoded]
                parts: list[Any] = [None] * world if rank == 0 else None
                dist.gather_object((payload, vecs), parts, dst=0)
                if rank == 0:
                    _commit_round(run, todo, parts, i, batch_size, world)
            return finish_run(run, index_type) if rank == 0 else None
    finally:
        dist.barrier()
        if started:
            dist.destroy_process_group()


def _commit_round(run: Any, todo: list, parts: list, i: int, batch_size: int, world: int) -> None:
    """Interleave the ranks' batch ``i`` back into to-do order and commit it."""
    slots: dict[int, tuple[Any, Any]] = {}
    for r, (payload, vecs) in enumerate(parts):
        good = iter(vecs if vecs is not None else [])
        for j, meta in enumerate(payload):
            vec = next(good) if meta[4] is None else None
            slots[(i * batch_size + j) * world + r] = (meta, vec)
    order = sorted(slots)
    items = [todo[k] for k in order]
    decoded = [
        embed.Decoded(torch.empty(0) if slots[k][0][4] is None else None, *slots[k][0])
        for k in order
    ]
    vecs = [slots[k][1] for k in order if slots[k][1] is not None]
    commit_batch(run.db, items, decoded, vecs, run.root_ids, run.report)
