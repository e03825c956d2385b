"""The difference between the folders on disk and the database: what an index run must do.

Unchanged means same size and mtime. A file whose size or mtime moved is hashed: same bytes only
refresh the row, other bytes are re-embedded. A new file of the same size and hash as a vanished
row is a rename: the row (and so its vector and id) moves, nothing is embedded. Only files that
could be renames or might be unchanged are hashed here; new files are hashed while being decoded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from indexes.scan import FileEntry, sha256_file
from indexes.store import Database


class Row(NamedTuple):
    id: int
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    label: str | None
    status: str
    reason: str | None


@dataclass
class Plan:
    """What to do, in the order it is applied (each step its own transaction)."""

    unchanged: int = 0
    renames: list[tuple[int, FileEntry]] = field(default_factory=list)
    delete: list[int] = field(default_factory=list)
    touch: list[tuple[int, FileEntry]] = field(default_factory=list)
    todo: list[tuple[FileEntry, int | None]] = field(default_factory=list)
    """Files to decode and embed, with the id of the row they replace (changed files)."""


def existing_rows(db: Database, root_ids: dict[str, int]) -> dict[tuple[str, bytes], Row]:
    """Rows under the roots of this run, keyed like ``FileEntry`` (root, relpath bytes)."""
    by_id = {i: r for r, i in root_ids.items()}
    q = (
        f"SELECT root_id, relpath_raw, id, size, mtime_ns, sha256, label, status, reason "
        f"FROM images WHERE root_id IN ({','.join('?' * len(by_id))})"
    )
    return {(by_id[r[0]], bytes(r[1])): Row(*r[2:]) for r in db.execute(q, list(by_id))}


def _hashes(paths: list[str]) -> list[str | None]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(sha256_file, paths))


def make_plan(entries: list[FileEntry], rows: dict[tuple[str, bytes], Row]) -> Plan:
    plan = Plan()
    seen: set[tuple[str, bytes]] = set()
    maybe_same: list[tuple[FileEntry, Row]] = []
    new: list[FileEntry] = []
    for e in entries:
        key = (e.root, e.relpath_raw)
        seen.add(key)
        row = rows.get(key)
        if row is None:
            new.append(e)
        elif e.error:
            if row.status == "error" and row.reason == e.error:
                plan.unchanged += 1
            else:
                plan.todo.append((e, row.id))
        elif row.size == e.size and row.mtime_ns == e.mtime_ns:  # errors are not retried either
            plan.unchanged += 1
            if row.label != e.label:
                plan.touch.append((row.id, e))
        elif row.status != "error" and row.size == e.size and row.sha256:
            maybe_same.append((e, row))
        else:
            plan.todo.append((e, row.id))
    for (e, row), sha in zip(maybe_same, _hashes([e.path for e, _ in maybe_same]), strict=True):
        if sha == row.sha256:
            plan.touch.append((row.id, e))
            plan.unchanged += 1
        else:
            plan.todo.append((e, row.id))

    gone = {k: r for k, r in rows.items() if k not in seen}
    movable: dict[tuple[int | None, str | None], list[int]] = {}
    for r in gone.values():
        if r.status in ("ok", "duplicate") and r.sha256:
            movable.setdefault((r.size, r.sha256), []).append(r.id)
    sizes = {size for size, _ in movable}
    candidates = [e for e in new if not e.error and e.size in sizes]
    hashed = dict(zip(map(id, candidates), _hashes([e.path for e in candidates]), strict=True))
    moved: set[int] = set()
    for e in new:
        ids = movable.get((e.size, hashed.get(id(e))))
        if ids:
            plan.renames.append((ids[0], e))
            moved.add(ids.pop(0))
        else:
            plan.todo.append((e, None))
    plan.delete = sorted(r.id for r in gone.values() if r.id not in moved)
    plan.todo.sort(key=lambda t: (t[0].root, t[0].relpath_raw))
    return plan
