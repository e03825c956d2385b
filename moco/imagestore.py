"""The decoded image store: each training image decoded once, into a memory-mapped uint8 file.

Decoding and resizing a JPEG costs more than augmenting it, and with per-image PIL transforms in
DataLoader workers it starves a GPU (126 img/s end to end against a 4,350 img/s step on an H200).
So every image is decoded once (``moco.data.load_image``: EXIF, alpha, bombs refused), downscaled
to fit a square canvas of ``side`` px and written into its own slot of ``pixels.u8``
(slots x side x side x 3, top-left aligned, its true height and width kept). Later epochs, resumed
runs and other runs on the same folder read the slots through a memory map: memory stays bounded
by the page cache, not by a Python list of images.

A store directory (one per data folder and canvas side, under ``default_root()``) holds:
    pixels.u8   the slots
    index.json  {"version", "side", "slots", "files": {path: [size, mtime_ns, slot, h, w, crc32]}}
                (slot -1: a file that could not be decoded, with its reason as the last field)
A file is reused while its path, size and mtime are unchanged, so a changed folder decodes only
what changed. A slot named by the current ``index.json`` is never written: new and changed images
go to free slots or past the end, and the new index replaces the old one atomically once their
pixels are on disk, so an interrupted update leaves the old store intact. A store from another
version, of the wrong length, or whose slots fail their checksums is rebuilt, never trusted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moco.data import ImageError, load_image
from moco.files import atomic_file

log = logging.getLogger(__name__)

VERSION = 2  # 1: slots x 3 x side x side (channels first)
CACHE_ENV = "MOCO_SEARCH_CACHE"
CHUNK = 64  # images per decoding task


class StoreError(ValueError):
    """The store cannot be written (read-only folder, full disk): train from the files instead.

    A ValueError, as the CLI reports user-fixable settings: the fix is another ``--store-dir``."""


def store_side(image_size: int) -> int:
    """The canvas side for training at ``image_size`` px.

    Small images keep twice the training size, so the smallest crops (a fifth of the area) are
    not upsampled; larger ones keep 1.15x on the short side of a 4:3 photo (the cache resolution
    of the issue that introduced the store), which bounds the store at 224 px to 353 KB an image.
    """
    if image_size <= 96:
        return 2 * image_size
    return math.ceil(1.15 * image_size * 4 / 3)


def default_root() -> Path:
    """Where stores live: ``$MOCO_SEARCH_CACHE/stores``, else ``~/.cache/moco-search/stores``."""
    base = os.environ.get(CACHE_ENV)
    return Path(base) / "stores" if base else Path.home() / ".cache" / "moco-search" / "stores"


def store_dir(root: Path, data: str | os.PathLike, side: int) -> Path:
    """The store of the folder ``data`` at ``side`` px: one per folder, shared by its runs."""
    key = hashlib.sha256(os.fsencode(Path(data).resolve())).hexdigest()[:16]
    return root / f"{Path(data).resolve().name or 'root'}-{key}-{side}px"


@dataclass
class ImageStore:
    """The training images as the batched augmentation reads them.

    ``images`` is slots x 3 x S x S uint8, channels last in memory (a memory map of
    ``pixels.u8``, each slot S x S x 3 as PIL decodes it): torch's uint8 resize, which crops
    the views on CPU, runs 1.3x faster on that layout. Dataset index ``i`` lives in slot
    ``slots[i]``, its true ``sizes[i]`` (height, width); ``valid[i]`` is False for a file that
    could not be decoded (it is reported and skipped, as by the PIL path).
    """

    images: torch.Tensor
    slots: torch.Tensor
    sizes: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.valid)

    def gather(self, ids: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """The uint8 canvases of dataset indexes ``ids`` (all valid), in pinned memory if asked."""
        slots = self.slots[ids]
        hwc = self.images.permute(0, 2, 3, 1)  # the memory map as laid out: a plain view
        out = torch.empty((len(ids), *hwc.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        return torch.index_select(hwc, 0, slots, out=out).permute(0, 3, 1, 2)


def _stat(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _decode_into(pixels: str, side: int, jobs: list[tuple[str, int]]) -> list[list[Any]]:
    """Decode ``jobs`` (path, slot) into their slots of ``pixels``; one result per job:
    [slot, h, w, crc32] or [-1, 0, 0, 0, reason]. Runs in a worker process."""
    mm = np.memmap(pixels, dtype=np.uint8, mode="r+")
    mm = mm.reshape(-1, side, side, 3)
    out: list[list[Any]] = []
    for path, slot in jobs:
        try:
            im = load_image(path, draft_size=side)
        except ImageError as e:
            out.append([-1, 0, 0, 0, str(e)])
            continue
        if max(im.size) > side:
            im.thumbnail((side, side))
        a = np.asarray(im, dtype=np.uint8)
        h, w = a.shape[:2]
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        canvas[:h, :w] = a
        mm[slot] = canvas
        out.append([slot, h, w, zlib.crc32(canvas)])
    mm.flush()
    return out


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class _Store:
    """One store directory: its index as read from disk, and the update that writes it."""

    def __init__(self, path: Path, side: int) -> None:
        self.path, self.side = path, side
        self.slot_bytes = 3 * side * side
        self.pixels, self.index_file = path / "pixels.u8", path / "index.json"
        self.files: dict[str, list[Any]] = {}
        self.slots = 0

    def load(self) -> None:
        """Read and check the index and the pixels it names; a bad store starts empty."""
        if not self.index_file.exists():
            return
        try:
            index = json.loads(self.index_file.read_text())
            problem = self._problem(index)
        except (OSError, ValueError, TypeError, KeyError) as e:
            problem = f"unreadable index ({type(e).__name__}: {e})"
        if problem:
            log.warning("image store %s is %s: rebuilding it", self.path, problem)
            self.index_file.unlink(missing_ok=True)
            self.pixels.unlink(missing_ok=True)
            return
        self.files, self.slots = index["files"], int(index["slots"])

    def _problem(self, index: dict[str, Any]) -> str:
        if index.get("version") != VERSION or index.get("side") != self.side:
            version, side = index.get("version"), index.get("side")
            return f"from another version (version {version}, side {side})"
        slots = int(index["slots"])
        if not self.pixels.is_file() or self.pixels.stat().st_size != slots * self.slot_bytes:
            return "of the wrong length"
        if not slots:
            return ""
        mm = np.memmap(self.pixels, dtype=np.uint8, mode="r").reshape(slots, self.slot_bytes)
        for entry in index["files"].values():
            slot = entry[2]
            if slot >= 0 and (slot >= slots or zlib.crc32(mm[slot]) != entry[5]):
                return f"damaged (slot {slot} fails its checksum)"
        return ""

    def update(self, paths: list[Path], workers: int) -> None:
        """Decode what is new or changed in ``paths`` into free slots; write the new index."""
        keep: dict[str, list[Any]] = {}
        todo: list[str] = []
        wanted = {os.fspath(p.resolve()) for p in paths}
        for key in wanted | set(self.files):
            st = _stat(Path(key))
            old = self.files.get(key)
            if old is not None and st is not None and (old[0], old[1]) == st:
                keep[key] = old
            elif key in wanted and st is not None:
                todo.append(key)
            elif key in wanted:
                keep[key] = [0, 0, -1, 0, 0, 0, "missing file"]
        if not todo and keep.keys() == self.files.keys():
            return
        used = {e[2] for e in self.files.values() if e[2] >= 0}  # never written: see module doc
        free = [s for s in range(self.slots) if s not in used]
        slots = free[: len(todo)] + list(range(self.slots, self.slots + len(todo) - len(free)))
        total = max([self.slots, *(s + 1 for s in slots)])
        self._reserve(total)
        stats = {key: _stat(Path(key)) for key in todo}
        results = self._decode(sorted(zip(todo, slots, strict=True)), workers)
        for key, (slot, h, w, crc, *reason) in results.items():
            size, mtime = stats[key] or (0, 0)
            keep[key] = [size, mtime, slot, h, w, crc, *reason]
        self.files, self.slots = keep, total
        with atomic_file(self.index_file) as tmp:
            Path(tmp).write_text(
                json.dumps({"version": VERSION, "side": self.side, "slots": total, "files": keep})
            )

    def _reserve(self, slots: int) -> None:
        need = slots * self.slot_bytes
        try:
            have = self.pixels.stat().st_size if self.pixels.exists() else 0
            free = shutil.disk_usage(self.path).free
            if need - have > free:
                raise StoreError(
                    f"needs {(need - have) / 2**30:.1f} GiB more and {self.path} has "
                    f"{free / 2**30:.1f} GiB free"
                )
            if need > have:
                with open(self.pixels, "ab") as f:
                    f.truncate(need)
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(f"cannot write {self.path}: {e.strerror or e}") from e

    def _decode(self, jobs: list[tuple[str, int]], workers: int) -> dict[str, list[Any]]:
        t0 = time.perf_counter()
        out: dict[str, list[Any]] = {}
        chunks = list(_chunks(jobs, CHUNK))
        pixels = os.fspath(self.pixels)
        pool = None
        if workers > 0 and len(chunks) > 1:
            # Ctrl-C reaches this process alone (the workers ignore it), which then cancels the
            # chunks not started: the old index stays, nothing half-written is trusted.
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
            futures = [pool.submit(_decode_into, pixels, self.side, c) for c in chunks]
            results = (f.result() for f in futures)
        else:
            results = (_decode_into(pixels, self.side, c) for c in chunks)
        bar = tqdm(total=len(jobs), unit="img", desc="decoding", mininterval=1.0, leave=False)
        try:
            for chunk, decoded in zip(chunks, results, strict=True):
                out.update(zip((k for k, _ in chunk), decoded, strict=True))
                bar.update(len(chunk))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        log.info(
            "decoded %d images into the store %s in %.1fs",
            len(jobs),
            self.path,
            time.perf_counter() - t0,
        )
        return out

    def open(self, paths: list[Path]) -> ImageStore:
        n = len(paths)
        slots = torch.zeros(n, dtype=torch.long)
        sizes = torch.zeros(n, 2, dtype=torch.long)
        valid = torch.zeros(n, dtype=torch.bool)
        for i, p in enumerate(paths):
            _, _, slot, h, w, _, *reason = self.files[os.fspath(p.resolve())]
            if slot < 0:
                log.warning("skipping %s: %s", p, reason[0] if reason else "unreadable")
                continue
            slots[i], sizes[i], valid[i] = slot, torch.tensor([h, w]), True
        shape = (self.slots, self.side, self.side, 3)
        if self.slots:
            images = torch.from_numpy(np.memmap(self.pixels, dtype=np.uint8, mode="c", shape=shape))
        else:
            images = torch.zeros(shape, dtype=torch.uint8)
        return ImageStore(images.permute(0, 3, 1, 2), slots, sizes, valid)


def open_store(paths: list[Path], side: int, path: Path, workers: int = 0) -> ImageStore:
    """The store at ``path`` for ``paths`` at ``side`` px, decoding what it lacks first.

    ``workers`` processes decode in parallel (0: in this process). Raises ``StoreError`` when
    the store cannot be written (the caller trains from the files instead).
    """
    store = _Store(path, side)
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / ".lock", "w")  # noqa: SIM115 - held until the store is open
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs on one folder: the second waits, then reuses
        store.load()
        store.update(paths, workers)
        return store.open(paths)
