"""Files written whole or not at all, and files' content hashes: the one copy of each.

Every file this project writes that a reader may open at any moment (checkpoints, encoders,
probes, the collection's index and manifest, thumbnails) is written to a temporary name beside
it and renamed into place, so a crash, a full disk or Ctrl-C leaves the old file or the new one,
never half of one, and no temporary file behind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""The operating system's "no space left on device" and "disk quota exceeded"."""


class DiskFullError(OSError, ValueError):
    """No room left to write, said in one line with what was kept and what to do.

    An ``OSError`` because it is one, and a ``ValueError`` so that the command line shows it as
    one line like every other error the user can act on.
    """


def is_within(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies below it (both already resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` made (with its parents) as the folder a command writes into: before any work,
    so that a file, a path under a file or one that cannot be made there fails at once, in a
    sentence that names ``flag`` (not "[Errno 17] File exists" after minutes of fitting)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file: give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        raise PermissionError(f"{flag} {path}: cannot make this folder ({e.strerror})") from e
    return path


@contextmanager
def output_folder_for(path: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """``output_folder`` for the length of the work: a folder made here is removed again if the
    work fails before writing into it, so that a failed command leaves nothing behind."""
    path = Path(path)
    made = not path.exists()
    output_folder(path, flag)
    try:
        yield path
    except BaseException:
        if made:
            with suppress(OSError):  # only an empty folder goes
                path.rmdir()
        raise


def file_identity(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """Which file is at ``path`` now (inode, size, mtime), or None: what a cache of something
    read from it is keyed on. Every writer here renames a whole new file into place, which
    changes the inode even within the file system's mtime granularity."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Busy(ValueError):
    """Another process is doing the work this one asked for (a refusal said in one line)."""


@contextmanager
def exclusive(
    lock: str | os.PathLike,
    busy: Callable[[str], str],
    waiting: Callable[[str], object] | None = None,
) -> Iterator[None]:
    """Hold an advisory ``flock`` on the file ``lock`` for the block, or raise ``Busy`` at once.

    Two processes writing one run or one collection undo each other's work, so a second is
    refused, not queued: ``busy(" (pid N)")`` is its sentence, N being the process id the holder
    wrote into the file. With ``waiting``, the second is told the sentence instead (``log.info``)
    and waits for the lock: for work that it would only repeat (the demo's first build). The
    kernel drops the lock when its process ends, however it ends, so a crash never leaves a
    stale lock to clear by hand. The file stays after the block, unless it is all its folder
    holds (a command that failed before its first write leaves nothing).
    """
    lock = Path(lock)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            said = busy(f" (pid {pid})" if pid.isdigit() else "")
            if waiting is None:
                raise Busy(said) from None
            waiting(said)
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C here raises KeyboardInterrupt as usual
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:  # only the holder, still holding it: a refused process removed the file of a
            # run that had written nothing yet, and a third then locked a new file beside it
            with suppress(OSError):  # never in place of the block's own error
                if [p.name for p in lock.parent.iterdir()] == [lock.name]:
                    lock.unlink()
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def atomic_file(path: str | os.PathLike, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it is gone.

    The temporary file is ``<name>.tmp``; with ``unique`` its name also carries the process and
    thread, for files that several threads may make at once (two searches showing the same
    thumbnail), which then never write into one temporary file. Write it with Python's own file
    writes (serialise to bytes first): ``torch.save`` and safetensors writing to a path report a
    full disk as a bare ``RuntimeError`` or ``SafetensorError``, Python as the ``OSError``
    (``ENOSPC``) it is.

    Examples:
        >>> with atomic_file(out / "model.safetensors") as tmp:  # doctest: +SKIP
        ...     tmp.write_bytes(safetensors.torch.save(state))
    """
    path = Path(path)
    who = f".{os.getpid()}-{threading.get_ident()}" if unique else ""
    tmp = path.with_name(f"{path.name}{who}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file: name the one being written
        raise


def file_hash(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """The hex digest of a file's bytes, read in chunks (encoders are hundreds of MB)."""
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
