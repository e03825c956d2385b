"""One index run at a time on a collection.

Two runs on one collection plan against the same rows, and the second trips over the rows the
first inserts (measured: ``sqlite3.IntegrityError: UNIQUE constraint failed`` halfway through,
as a traceback). A nightly job that overlaps a manual run, or the web UI's "Index" while the
command line indexes, get there easily. So a run holds an advisory ``flock`` on ``index.lock`` in
the collection from before it reads the manifest until the manifest is written. The kernel drops
the lock when its process ends, however it ends, so a crash or ``kill -9`` never leaves a stale
lock to clear by hand. The file stays (removing a lock file races with its next taker), unless it
is all the folder holds: a new collection refused before its first write leaves nothing behind.
Searches take no lock: they read committed rows and whole files only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from indexes import preflight
from moco import Busy, exclusive

LOCK_NAME = "index.lock"


class CollectionBusy(Busy):
    """Another process is indexing the collection (a user-facing refusal, not a fault)."""


@contextmanager
def held(collection: Path) -> Iterator[None]:
    """Hold ``collection``'s index lock for the block, or raise ``CollectionBusy`` at once.

    The collection path is checked first (``preflight.check_collection``), so a file or a
    read-only place is refused with its reason rather than a bare ``EACCES`` from the lock file.
    A collection folder made here is removed again if the block writes nothing into it, so a
    run refused before its first write (a broken encoder) still leaves nothing behind.
    """
    collection = Path(collection)
    preflight.check_collection(collection)
    made = not collection.exists()
    collection.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(collection / LOCK_NAME, lambda holder: _busy(collection, holder)):
            yield
    except Busy as e:
        raise CollectionBusy(str(e)) from None
    finally:
        if made:
            with suppress(OSError):  # only an empty folder goes
                collection.rmdir()


def _busy(collection: Path, holder: str) -> str:
    return (
        f"Collection {collection} is being indexed by another process{holder}; nothing was "
        "changed. Run this again when that run has finished"
    )
