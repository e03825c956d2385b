"""Search filters as parameterised SQL over the ``images`` table.

A filter selects ids in SQLite (using its indexes, never loading all metadata into Python); the
ids then restrict the FAISS search through an ``IDSelectorBatch``, or, when few match and the
index is approximate, the matching stored vectors are scored exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlite_utils import Database


@dataclass(frozen=True)
class Filters:
    """Restrictions on hits; None means no restriction. ``path_glob`` matches the relative path
    with SQLite GLOB syntax (case-sensitive, ``*`` also crosses ``/``); dates are Unix times of
    the file's mtime."""

    label: str | None = None
    path_glob: str | None = None
    min_width: int | None = None
    min_height: int | None = None
    modified_after: float | None = None
    modified_before: float | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in vars(self).values())


def where(filters: Filters | None) -> tuple[str, list[Any]]:
    """A WHERE clause (for ``images``) selecting indexed images that pass ``filters``."""
    clauses, params = ["images.status = 'ok'"], []
    f = filters or Filters()
    for value, clause in (
        (f.label, "images.label = ?"),
        (f.path_glob, "images.relpath GLOB ?"),
        (f.min_width, "images.width >= ?"),
        (f.min_height, "images.height >= ?"),
        (f.modified_after, "images.mtime > ?"),
        (f.modified_before, "images.mtime < ?"),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def allowed_ids(db: Database, filters: Filters | None) -> np.ndarray | None:
    """Sorted ids passing ``filters``, or None when there is nothing to filter on."""
    if filters is None or filters.is_empty():
        return None
    sql, params = where(filters)
    rows = db.execute(f"SELECT id FROM images WHERE {sql} ORDER BY id", params)
    return np.fromiter((r[0] for r in rows), dtype=np.int64)
