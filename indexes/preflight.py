"""What an index run checks before it writes anything: arguments, folders, the collection.

A mistake found after every image was embedded costs the whole run, and one found after the
first write can leave a collection behind that refuses the corrected command; so these checks
all run first, and each names the bad value.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from indexes import faults, manifest, store, vectors
from indexes.plan import Row
from indexes.scan import FileEntry
from moco import is_within, read_encoder_config

log = logging.getLogger(__name__)

WRITTEN = (manifest.MANIFEST_NAME, store.DB_NAME, vectors.INDEX_NAME)
"""The files of a collection that an index run replaces or updates."""


def resolve(
    roots: list[Path],
    collection: Path,
    encoder: Path | None,
    old: dict | None,
    forgot: bool = False,
) -> tuple[list[str], Path]:
    """The run's root folders (absolute) and encoder directory, defaulting to the manifest's;
    none at all only when ``forgot`` (``--forget-root`` removed the collection's last one)."""
    if encoder is None:
        if old is None and vector_count(collection):
            raise ValueError(
                f"Collection {collection} has its database but no {manifest.MANIFEST_NAME} "
                "(deleted, or not copied with the database?): give the encoder that made its "
                "vectors (--encoder ENC) to write it again, ids and labels kept"
            )
        if old is None:
            raise ValueError(f"{collection} is a new collection: give the encoder to index with")
        encoder = Path(old["encoder"]["path"])
    names = [os.path.abspath(r) for r in roots] or list((old or {}).get("roots", []))
    if not names and not forgot:
        raise ValueError("No image folders given to index")
    for r in names:
        if os.path.exists(r) and not os.path.isdir(r):
            raise NotADirectoryError(f"Not a folder: {r} is a file; give the folder that holds it")
        if not os.path.isdir(r) and not roots:  # one of the collection's own: say the way out
            raise FileNotFoundError(
                f"Image folder not found: {r}, a folder of collection {collection}. If it moved, "
                f"run again with --move-root {r} NEW_PLACE (ids, labels and vectors are kept); "
                f"to remove its images from the collection, --forget-root {r}"
            )
        if not os.path.isdir(r):
            raise FileNotFoundError(f"Image folder not found: {r}")
    gone = [r for r in (old or {}).get("roots", []) if r not in names and not os.path.isdir(r)]
    if roots and gone:  # a new folder while one of the collection's is gone: moved there?
        log.warning(
            "%s, a folder of this collection, is gone. If %s is where it moved, stop this run "
            "and use --move-root %s %s instead: its images keep their ids and labels, where "
            "this run embeds them all again as copies of images whose files are gone",
            gone[0],
            names[0],
            gone[0],
            names[0],
        )
    return distinct_roots(names, (old or {}).get("roots", [])), Path(encoder)


def distinct_roots(names: list[str], indexed: list[str]) -> list[str]:
    """``names`` once each (``small`` and ``./small/`` are one folder: scanned twice, its files
    failed the database's unique path with an IntegrityError), an indexed folder by the name the
    collection knows it by (a symlink to it was indexed again, every image an exact copy of
    itself); a folder inside another root, given or already indexed, is refused: its images
    would be in the collection twice."""
    by_real = {os.path.realpath(n): n for n in reversed(names)}  # the first spelling wins
    known = {os.path.realpath(r): r for r in indexed}
    for real, name in by_real.items():
        for other, other_name in [*by_real.items(), *known.items()]:
            if real == other:
                continue
            if is_within(real, other):
                outer, inner = other_name, name
                fix = f"index {outer} alone (its subfolders are scanned with it)"
            elif other in known and is_within(other, real):  # a new root above an indexed one
                outer, inner = name, other_name
                fix = f"index {outer} into a new collection (this one holds {inner} already)"
            else:
                continue
            raise ValueError(
                f"{inner} lies inside {outer}: with both indexed, its images would be in the "
                f"collection twice; {fix}"
            )
    spelled = {real: known.get(real, name) for real, name in by_real.items()}
    for name in names:
        if (known_as := spelled[os.path.realpath(name)]) != by_real[os.path.realpath(name)]:
            log.info("%s is %s, a folder of the collection: re-scanning it", name, known_as)
    return list(dict.fromkeys(spelled[os.path.realpath(n)] for n in names))


def check_options(batch_size: int, workers: int | None) -> None:
    """Refuse impossible options before any work, not after every image was embedded."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")


OWN_NAMES = {
    *WRITTEN,
    *(f"{store.DB_NAME}-{end}" for end in ("wal", "shm", "journal")),
    "index.lock",
    "thumbs",
    "probes",
    "app_labels.json",
}
"""What a collection may hold without its manifest (a first run killed early, a lost manifest)."""


def check_collection(collection: Path) -> None:
    """A collection path that is a file, or that cannot be written, is refused up front; so is
    a folder that holds other things and no collection (an image folder, an encoder, a run, or
    anything else): the run would write its database among them, and an image folder given as
    its own collection came out empty, with rc 0."""
    if collection.exists() and not collection.is_dir():
        raise NotADirectoryError(f"Collection {collection} is a file, not a folder")
    if collection.is_dir() and not (collection / manifest.MANIFEST_NAME).is_file():
        names = {n for n in os.listdir(collection) if not n.endswith(".tmp")}
        if others := sorted(names - OWN_NAMES):
            what = manifest.not_a_collection(collection)
            if what.startswith("Not a collection"):
                what = (
                    f"{collection} holds other files ({others[0]}"
                    + (", ..." if len(others) > 1 else "")
                    + ") and no collection: give a new or empty folder for the collection"
                )
            raise ValueError(f"{what}; nothing was written")
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


def check_manifest_kept(collection: Path, encoder: Path) -> list[str]:
    """A database holding vectors beside no ``manifest.json`` (deleted, or not copied with the
    database) is indexed on only with the encoder that made them (``encoder``), which then
    writes the manifest again: ids, vectors and labels are kept, and so are its folders (those
    of its images, returned, also the ones not given this time). With any other, indexing bound
    the collection to it and kept the old vectors: another size failed at the first search,
    the same size mixed two encoders' vectors in silence. Databases older than the key that
    names their encoder cannot tell, and are refused."""
    n = vector_count(collection)
    if not n:
        return []
    content_hash = read_encoder_config(encoder).content_hash
    db = store.open_store(collection / store.DB_NAME, create=False)
    try:
        made_by = store.read_info(db).get(store.ENCODER_HASH)
        folders = [
            r[0]
            for r in db.execute(
                "SELECT path FROM roots WHERE id IN (SELECT root_id FROM images) ORDER BY path"
            )
        ]
    finally:
        db.conn.close()
    if made_by == content_hash:
        log.warning(
            "%s had lost its %s: written again for encoder %s, which made its %d vectors, "
            "and its images' folders (%d). What only it held is back to its default (the "
            "index type and memory budget, a remembered labels CSV)",
            collection,
            manifest.MANIFEST_NAME,
            content_hash[:16],
            n,
            len(folders),
        )
        return folders
    need = f"encoder {made_by[:16]}" if made_by else "an encoder it does not name"
    raise ValueError(
        f"Collection {collection} holds {n} vectors of {need} but no {manifest.MANIFEST_NAME} "
        "(deleted, or not copied with the database?): restore it from a backup, "
        + ("index again with that encoder, " if made_by else "")
        + "or index the folders into a new collection; nothing was changed"
    )


def labels_source(
    given: Path | None, folder_labels: bool, old: dict | None
) -> tuple[Path | None, bool]:
    """The labels CSV of this run, and whether indexed images keep the labels they have.

    A ``--labels`` CSV is remembered in the manifest and read again by a run that gives none
    (the nightly ``index --collection C``, the web UI's re-scan): those set every label back to
    the folder names, in silence (measured: a CSV's label gone after one plain re-run). If the
    file is gone, the images keep their labels, with a warning. ``folder_labels`` forgets the CSV.
    """
    if given is not None and folder_labels:
        raise ValueError("give --labels CSV or --folder-labels, not both")
    remembered = (old or {}).get("labels_csv")
    if given is not None or folder_labels or not remembered:
        return given, False
    if Path(remembered).is_file():
        log.info("labels from %s (the collection's --labels CSV)", remembered)
        return Path(remembered), False
    log.warning(
        "%s, the labels CSV this collection was indexed with, is gone: indexed images keep their "
        "labels (new ones take their folder's name); give --labels CSV again, or --folder-labels",
        remembered,
    )
    return None, True


def check_not_emptied(roots: list[str], entries: list[FileEntry], rows: dict[Any, Row]) -> None:
    """Refuse a run that would empty a root: one holding indexed images, where no file is found.

    An external drive that is not mounted leaves its mount point an empty folder, and a re-scan
    then removed every image of it from the collection (measured: "67 removed"), with the labels
    given in the UI and the predictions; mounted again, each image was embedded anew, under a new
    id. Deleting every image of a folder on purpose is rare enough to ask for ``--allow-empty``.
    """
    found = {e.root for e in entries}
    held = Counter(root for (root, _), row in rows.items() if row.status != "error")
    for root in roots:
        if held[root] and root not in found:
            n = held[root]
            raise ValueError(
                f"{root} holds no image file now, but the collection has {n:,} "
                f"image{'s' if n > 1 else ''} from it: a drive not mounted, or the folder moved? "
                "Nothing was removed. If they were deleted on purpose, run again with "
                "--allow-empty to remove them from the collection"
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
