"""``moco-search info``: what a collection holds and how it stands, without the web UI.

One look answers the questions a collection raises over months: which encoder made its vectors
and whether it is still there, which folders it covers and whether each is mounted, how many
images, copies and failures, when it was last indexed and what that run did, which probes still
fit the encoder, and whether a ``--reembed`` was left unfinished. Everything comes from the
manifest and a read-only look at the database, so it works on a read-only copy, beside an index
run in progress (SQLite's WAL readers never wait), and when the encoder or a folder is gone:
the times one asks.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from indexes import manifest, store, switch, vectors
from indexes.budget import format_bytes
from indexes.probes import list_probes


@dataclass
class Status:
    """A collection's state; ``as_dict`` is what ``info --json`` prints."""

    path: str
    images: int
    copies: int
    errors: int
    labels: int
    """Distinct labels images were indexed with (folder names or ``--labels``)."""
    ui_labels: int
    """Images labelled in the web UI."""
    folders: list[dict[str, Any]]
    encoder: dict[str, Any]
    index: dict[str, Any]
    database_bytes: int
    updated: float | None
    last_run: dict[str, Any] = field(default_factory=dict)
    probes: list[dict[str, Any]] = field(default_factory=list)
    reembed: dict[str, Any] | None = None
    """An unfinished ``--reembed``: its encoder and how many vectors it staged."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The lines ``info`` prints: what is wrong says so on its own line."""
        enc, idx = self.encoder, self.index
        lines = [
            f"collection {self.path}",
            f"  images: {self.images} indexed, {self.copies} exact "
            f"cop{'y' if self.copies == 1 else 'ies'}, {self.errors} "
            f"error{'' if self.errors == 1 else 's'}; {self.labels} labels"
            + (
                f", {self.ui_labels} image{'' if self.ui_labels == 1 else 's'} labelled in the "
                "web UI"
                if self.ui_labels
                else ""
            ),
        ]
        for f in self.folders:
            gone = "" if f["present"] else "  (not found: --move-root it if it moved)"
            lines.append(f"  folder: {store.printable(f['path'])} ({f['images']} images){gone}")
        lines.append(
            f"  encoder: {enc['path']} ({enc['arch']}, {enc['feature_dim']}-d {enc['pooling']}, "
            f"{enc['image_size']} px, hash {enc['content_hash'][:16]})"
            + ("" if enc["present"] else "  (not found: searching by image needs it)")
        )
        lines.append(
            f"  index: {idx.get('factory', '?')}, {idx.get('ntotal', 0)} vectors, "
            f"{format_bytes(idx.get('file_bytes', 0))}, recall@10 {idx.get('recall_at_10', '?')}; "
            f"database {format_bytes(self.database_bytes)} "
            f"({idx.get('vector_dtype', 'float32')} vectors)"
        )
        if self.updated:
            run = self.last_run
            what = ", ".join(
                f"{run[k]} {k}" for k in ("added", "updated", "renamed", "removed") if run.get(k)
            )
            lines.append(
                f"  last indexed: {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.updated))}"
                f" ({what or 'nothing changed'}"
                + (f", {run['reembedded']} re-embedded" if run.get("reembedded") else "")
                + ")"
            )
        for p in self.probes:
            fit = (
                "fits this encoder"
                if p["current"]
                else "trained on another encoder: run probe train again"
            )
            top1 = f", top-1 {p['top1']:.1f}%" if p.get("top1") is not None else ""
            lines.append(f"  probe {p['name']}: {p['classes']} classes{top1}; {fit}")
        if self.reembed:
            r = self.reembed
            lines.append(
                f"  unfinished --reembed: {r['staged']} of {self.images} images staged for "
                f"encoder {r['path']} ({r['content_hash'][:16]}); run it again to finish"
            )
        return "\n".join(lines)


def collection_status(collection: str | os.PathLike) -> Status:
    """The state of ``collection``, read without writing anything."""
    path = Path(collection)
    db_path = path / store.DB_NAME
    if not db_path.is_file():
        manifest.read_manifest(path)  # a clear error for a non-collection
        raise FileNotFoundError(f"Collection database missing: {db_path}")
    db = store.Database(store.connect_read_only(db_path))
    try:
        m, _ = switch.read_adopted(path, db)
        counts = store.status_counts(db)
        per_root = dict(
            db.execute(
                "SELECT roots.path, count(*) FROM images JOIN roots ON roots.id = images.root_id "
                "WHERE images.status = 'ok' GROUP BY roots.path"
            ).fetchall()
        )
        labels = db.execute(
            "SELECT count(DISTINCT label) FROM images WHERE status = 'ok' AND label IS NOT NULL"
        ).fetchone()[0]
        ui_labels = len(store.user_labels(db))  # {} before the first label given in the UI
        pending = switch.unfinished(db)
    finally:
        db.conn.close()
    enc, cfg = m["encoder"], m["encoder"].get("config", {})
    hash_ = enc["content_hash"]
    return Status(
        path=str(path),
        images=int(counts.get("ok", 0)),
        copies=int(counts.get("duplicate", 0)),
        errors=int(counts.get("error", 0)),
        labels=int(labels),
        ui_labels=ui_labels,
        folders=[
            {"path": r, "images": int(per_root.get(r, 0)), "present": os.path.isdir(r)}
            for r in m.get("roots", [])
        ],
        encoder={
            "path": enc["path"],
            "content_hash": hash_,
            "arch": cfg.get("arch"),
            "feature_dim": m.get("feature_dim"),
            "pooling": cfg.get("pooling", "avg"),
            "image_size": cfg.get("image_size"),
            "present": os.path.isdir(enc["path"]),
        },
        index={
            **{k: v for k, v in m.get("index", {}).items() if k != "params"},
            "vector_dtype": m.get("vector_dtype", "float32"),
            "present": (path / vectors.INDEX_NAME).is_file(),
        },
        database_bytes=db_path.stat().st_size,
        updated=m.get("updated"),
        last_run=dict(m.get("last_run", {})),
        probes=[
            {
                "name": name,
                "classes": len(meta.get("classes", [])),
                "top1": (meta.get("metrics") or {}).get("top1"),
                "current": meta.get("encoder_hash") == hash_,
            }
            for name, meta in list_probes(path).items()
        ],
        reembed=(
            {
                "path": pending[0]["path"],
                "content_hash": pending[0]["content_hash"],
                "staged": pending[1],
            }
            if pending
            else None
        ),
    )
