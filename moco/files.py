"""Files written whole or not at all, and files' content hashes: the one copy of each.

Every file this project writes that a reader may open at any moment (checkpoints, encoders,
probes, the collection's index and manifest, thumbnails) is written to a temporary name beside
it and renamed into place, so a crash, a full disk or Ctrl-C leaves the old file or the new one,
never half of one, and no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it is gone.

    The temporary file is ``<name>.tmp``; with ``unique`` its name also carries the process and
    thread, for files that several threads may make at once (two searches showing the same
    thumbnail), which then never write into one temporary file.

    Examples:
        >>> with atomic_file(run / "checkpoint_last.pt") as tmp:  # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    path = Path(path)
    who = f".{os.getpid()}-{threading.get_ident()}" if unique else ""
    tmp = path.with_name(f"{path.name}{who}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_hash(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """The hex digest of a file's bytes, read in chunks (encoders are hundreds of MB)."""
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
