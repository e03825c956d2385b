"""A collection's folders that moved or went for good: ``index --move-root`` and ``--forget-root``.

Rows store paths relative to their root, so a photo library moved to another disk is one update
of the ``roots`` table: ids, vectors, labels given in the UI and predictions all stay, and the
scan that follows finds every file unchanged (or, copied with new times, hashes it and finds the
same bytes). Without it a moved folder was a dead end: indexing the new place embedded every
image again as an "exact copy" of a row whose file was gone, search answered with paths that no
longer existed, and every later re-scan failed on the old folder ("Image folder not found").
Both run inside the index run's lock, before its scan, in one transaction each, and rewrite the
manifest's roots at once; a crash between the two leaves a state that the same command repairs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from indexes import manifest, store
from indexes.preflight import distinct_roots
from moco import is_within

log = logging.getLogger(__name__)


def move_root(collection: Path, m: dict, old: Path, new: Path) -> dict:
    """Point the rows under root ``old`` at folder ``new``; return the manifest, rewritten.

    ``new`` may already be a root (indexed there before this command existed, every image as an
    exact copy of one under ``old``): its rows at the relative paths of ``old``'s are dropped and
    ``old``'s rows, with their ids and labels, take their place.
    """
    roots = list(m.get("roots", []))
    src, dst = os.path.abspath(old), os.path.abspath(new)
    if src not in roots and dst in roots and m.get("moved_roots", {}).get(src) == dst:
        log.info("%s: %s was moved to %s already", collection, src, dst)  # the command again,
        return m  # after a later step of it failed
    src = _known(old, roots, collection)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise NotADirectoryError(f"--move-root: {dst} is a file, not a folder")
    if not os.path.isdir(dst):
        raise FileNotFoundError(f"--move-root: image folder not found: {dst}")
    if dst != src:
        distinct_roots([dst], [r for r in roots if r not in (src, dst)])  # nested: refused
    db = store.open_store(collection / store.DB_NAME)
    try:
        if dst != src:
            check_moved_here(db, src, dst)
        with store.transaction(db):
            src_id, dst_id = store.root_id(db, src), store.root_id(db, dst)
            if src_id != dst_id:
                clash = [
                    r[0]
                    for r in db.execute(
                        "SELECT n.id FROM images n JOIN images o ON o.relpath_raw = n.relpath_raw "
                        "WHERE n.root_id = ? AND o.root_id = ?",
                        [dst_id, src_id],
                    )
                ]
                store.delete_rows(db, clash)
                db.execute("UPDATE images SET root_id = ? WHERE root_id = ?", [dst_id, src_id])
                db.execute("DELETE FROM roots WHERE id = ?", [src_id])
                store.bump_generation(db)
                log.info(
                    "%s: %s moved to %s (%d rows indexed there before dropped)",
                    collection,
                    src,
                    dst,
                    len(clash),
                )
    finally:
        db.conn.close()
    moved = {**m.get("moved_roots", {}), src: dst}  # so that the same command again is a no-op
    m = {**m, "roots": sorted({r for r in roots if r != src} | {dst}), "moved_roots": moved}
    manifest.write_manifest(collection, m)
    return m


def check_moved_here(db: store.Database, src: str, dst: str) -> None:
    """Refuse a ``--move-root`` whose ``dst`` does not hold ``src``'s images.

    The move drops every row under ``src`` that ``dst`` lacks: given the wrong folder (a typo'd
    path, another collection's photos, a folder inside ``src``), it would remove the images, their
    ids and labels, in silence. So ``dst`` must hold at least half of the files indexed under
    ``src``, at the same relative paths, and must not lie inside it.
    """
    if is_within(dst, src):
        raise ValueError(
            f"--move-root: {dst} lies inside {src}, so it is not where {src} moved; to index only "
            f"that folder, --forget-root {src}, then index {dst}. Nothing was changed."
        )
    row = db.execute("SELECT id FROM roots WHERE path_raw = ?", [os.fsencode(src)]).fetchone()
    rels = [
        r[0]
        for r in db.execute(
            "SELECT relpath_raw FROM images WHERE root_id = ? ORDER BY relpath_raw",
            [row[0] if row else -1],
        )
    ]
    missing = [r for r in rels if not os.path.lexists(os.path.join(os.fsencode(dst), r))]
    if rels and len(missing) > len(rels) / 2:
        raise ValueError(
            f"--move-root: {len(missing)} of the {len(rels)} files indexed under {src} are not "
            f"under {dst} (first: {os.fsdecode(missing[0])}): is that where the folder moved? "
            f"Nothing was changed. To drop the folder's images instead: --forget-root {src}"
        )


def forget_root(collection: Path, m: dict, old: Path) -> tuple[dict, int]:
    """Remove root ``old`` and every row under it; return the manifest, rewritten, and the count."""
    roots = list(m.get("roots", []))
    src = _known(old, roots, collection)
    db = store.open_store(collection / store.DB_NAME)
    try:
        with store.transaction(db):
            src_id = store.root_id(db, src)
            ids = [r[0] for r in db.execute("SELECT id FROM images WHERE root_id = ?", [src_id])]
            store.delete_rows(db, ids)
            db.execute("DELETE FROM roots WHERE id = ?", [src_id])
            store.bump_generation(db)
    finally:
        db.conn.close()
    m = {**m, "roots": sorted(r for r in roots if r != src)}
    manifest.write_manifest(collection, m)
    log.info("%s: forgot %s and its %d rows", collection, src, len(ids))
    return m, len(ids)


def _known(folder: Path, roots: list[str], collection: Path) -> str:
    """``folder`` as the collection records it (absolute), or a refusal that lists its folders."""
    path = os.path.abspath(folder)
    if path not in roots:
        raise ValueError(
            f"{path} is not a folder of collection {collection}; its folders: "
            + (", ".join(roots) or "none")
        )
    return path
