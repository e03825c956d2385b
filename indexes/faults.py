"""Writing a collection on a machine that can fail: atomic files, a full disk, read-only media.

Every file of a collection is replaced atomically (``atomic_file``: write ``<name>.tmp``, then
rename), and the temporary file is removed on every error path, Ctrl-C included, so a fault never
leaves half a file behind. SQLite rolls back the batch it was committing. A run stopped by a full
disk therefore keeps everything committed before it, and re-running once space is freed carries
on; ``CollectionError`` says so in one line instead of a SQLite or FAISS traceback.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moco import DISK_FULL, DiskFullError
from moco import atomic_file as atomic_file  # re-exported for the collection's writers

SQLITE_FULL, SQLITE_IOERR = 13, 10
NEARLY_FULL = 1 << 20


class CollectionError(DiskFullError):
    """A full disk met while writing a collection, with what was kept (one line on the
    command line, as every ``DiskFullError``)."""


def is_disk_full(e: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether ``e`` is SQLite's or the operating system's "no space left" (or quota).

    SQLite says "disk I/O error", not "disk is full", when the disk fills up while it grows
    ``-shm`` or ``-wal`` (measured on a full tmpfs); with ``folder`` given, an I/O error on a
    file system with less than ``NEARLY_FULL`` bytes free counts as a full disk too.
    """
    if isinstance(e, sqlite3.OperationalError):
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # primary code of an extended one
        if code == SQLITE_FULL or "disk is full" in str(e):
            return True
        return code == SQLITE_IOERR and folder is not None and _free(folder) < NEARLY_FULL
    return isinstance(e, OSError) and e.errno in DISK_FULL


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its closest existing parent: where a new collection would be created."""
    path = Path(path).absolute()
    return next(p for p in [path, *path.parents] if p.exists())


def _free(folder: str | os.PathLike) -> int:
    st = os.statvfs(nearest_existing(folder))
    return st.f_bavail * st.f_frsize


@contextmanager
def disk_full_reported(collection: str | os.PathLike) -> Iterator[None]:
    """Turn "no space left" from SQLite, FAISS or a file write into one ``CollectionError``."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as e:
        if not is_disk_full(e, collection):
            raise
        raise CollectionError(
            f"Disk full while writing collection {collection}: nothing was lost (the batches "
            "committed before are kept, no temporary file is left); free some space and re-run "
            "to carry on"
        ) from e


def not_writable(folder: Path, names: tuple[str, ...] = ()) -> str | None:
    """Why the existing ``folder``, or one of the files ``names`` in it, cannot be written.

    None when all can. ``os.access`` answers for the real user and for read-only mounts (root
    included); root ignores permission bits, so for root only a read-only mount counts, as it
    should.
    """
    for path in [folder, *(folder / n for n in names)]:
        if path.exists() and not os.access(path, os.W_OK):
            read_only = os.statvfs(path).f_flag & os.ST_RDONLY
            why = "read-only file system" if read_only else "permission denied"
            return why if path == folder else f"{why}: {path.name}"
    return None
