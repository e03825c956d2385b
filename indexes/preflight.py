"""What an index run checks before it writes anything: arguments, folders, the collection.

A mistake found after every image was embedded costs the whole run, and one found after the
first write can leave a collection behind that refuses the corrected command; so these checks
all run first, and each names the bad value.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from indexes import faults, manifest, store, vectors

WRITTEN = (manifest.MANIFEST_NAME, store.DB_NAME, vectors.INDEX_NAME)
"""The files of a collection that an index run replaces or updates."""


def resolve(
    roots: list[Path], collection: Path, encoder: Path | None, old: dict | None
) -> tuple[list[str], Path]:
    """The run's root folders (absolute) and encoder directory, defaulting to the manifest's."""
    if encoder is None:
        if old is None:
            raise ValueError(f"{collection} is a new collection: give the encoder to index with")
        encoder = Path(old["encoder"]["path"])
    names = [os.path.abspath(r) for r in roots] or list((old or {}).get("roots", []))
    if not names:
        raise ValueError("No image folders given to index")
    for r in names:
        if os.path.exists(r) and not os.path.isdir(r):
            raise NotADirectoryError(f"Not a folder: {r} is a file; give the folder that holds it")
        if not os.path.isdir(r):
            raise FileNotFoundError(f"Image folder not found: {r}")
    return names, Path(encoder)


def check_options(batch_size: int, workers: int | None) -> None:
    """Refuse impossible options before any work, not after every image was embedded."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")


def check_collection(collection: Path) -> None:
    """A collection path that is a file, or that cannot be written, is refused up front."""
    if collection.exists() and not collection.is_dir():
        raise NotADirectoryError(f"Collection {collection} is a file, not a folder")
    existing = faults.nearest_existing(collection)
    if existing != collection.absolute():
        if why := faults.not_writable(existing):
            raise PermissionError(
                f"Cannot create collection {collection}: {existing} is not writable ({why})"
            )
    elif why := faults.not_writable(collection, WRITTEN):
        raise PermissionError(
            f"Collection {collection} is not writable ({why}); nothing was changed. "
            "It can still be searched; index into a writable copy to update it"
        )


def vector_count(collection: Path) -> int:
    """Vectors stored in ``collection``: 0 for a new one, or one whose first runs all failed."""
    path = collection / store.DB_NAME
    if not path.is_file():
        return 0
    db = store.open_store(path, create=False)
    try:
        return int(db.execute("SELECT count(*) FROM vectors").fetchone()[0])
    except sqlite3.OperationalError:  # no tables yet
        return 0
    finally:
        db.conn.close()
