"""Indexing an image collection into FAISS + SQLite, and searching it.

The public names are imported lazily (PEP 562): ``launch.py`` imports ``indexes.cli`` to build
its parser, and that must not pull in torch and faiss before a command actually runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexes.build import IndexReport, index_images
    from indexes.collection import Collection, EncoderMissing, Hit
    from indexes.export import ExportResult, export_embeddings
    from indexes.filters import Filters
    from indexes.runlock import CollectionBusy
    from indexes.store import Record

_WHERE = {
    "Collection": "indexes.collection",
    "CollectionBusy": "indexes.runlock",
    "EncoderMissing": "indexes.collection",
    "ExportResult": "indexes.export",
    "Filters": "indexes.filters",
    "Hit": "indexes.collection",
    "IndexReport": "indexes.build",
    "Record": "indexes.store",
    "export_embeddings": "indexes.export",
    "index_images": "indexes.build",
}

__all__ = [
    "Collection",
    "CollectionBusy",
    "EncoderMissing",
    "ExportResult",
    "Filters",
    "Hit",
    "IndexReport",
    "Record",
    "export_embeddings",
    "index_images",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'indexes' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
