"""``AppContext``: what the web UI holds while it serves one collection.

The UI is built around one opened ``Collection`` plus the few things that change while it runs:
the classifier in use (rebuilt after a probe is retrained), labels typed into the UI, and at most
one background index run. Everything is passed to ``build_demo`` explicitly; nothing is global.

It also decides what the server may serve and index (docs/ui.md "Security"): the browser gets
only thumbnails made from rows of the collection (``shown_file``), served from one folder that
holds nothing else (``served_dirs``); the collection's own files are blocked; and the UI indexes
only the collection's roots and folders the command line allowed (``check_index_folder``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.thumbnails import choose_thumbs_dir, thumbnail
from indexes import Collection
from indexes.manifest import MANIFEST_NAME
from moco import KNN_K, is_within

log = logging.getLogger(__name__)
USER_LABELS = "app_labels.json"
"""Where earlier versions kept the UI's labels; read once and moved into the database."""
USER_PROBE = "ui"
PRIVATE_FILES = (
    "meta.db",
    "meta.db-wal",
    "meta.db-shm",
    "meta.db-journal",
    "manifest.json",
    "manifest.json.tmp",
    "index.faiss",
    "index.faiss.tmp",
    "probes",
    USER_LABELS,
)
"""Files a collection has or may have later; blocked together with whatever else is in it."""


@dataclass
class IndexJob:
    """Progress of the background index run (read by the UI's progress poller)."""

    folder: str
    done: int = 0
    total: int = 0
    finished: bool = False
    message: str = ""
    started: float = field(default_factory=time.time)

    def line(self) -> str:
        if self.finished:
            return self.message
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"Indexing {self.folder}: {self.done}/{self.total or '?'} images{pct}"


class AppContext:
    """One collection opened for the UI; safe to share between Gradio's worker threads."""

    def __init__(
        self,
        collection: Collection,
        example: str | None = None,
        allow_index: tuple[str | os.PathLike, ...] = (),
    ) -> None:
        self.collection = collection
        self.example = example
        self.title = collection.path.name
        """How the page names the collection (the demo's says "demo")."""
        self._lock = threading.Lock()
        self._classifiers: dict[str, tuple[Any, Any]] = {}  # name: (made from, classifier)
        self.job: IndexJob | None = None
        self.thumbs = choose_thumbs_dir(self.path)
        self.allow_index = tuple(os.path.realpath(Path(d).expanduser()) for d in allow_index)
        """Folders (and the folders below them) that the UI may add to the collection."""

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        device: str = "cpu",
        example: str | None = None,
        allow_index: tuple[str | os.PathLike, ...] = (),
    ) -> AppContext:
        return cls(Collection.open(path, device=device), example=example, allow_index=allow_index)

    @property
    def path(self) -> Path:
        return self.collection.path

    def roots(self) -> list[str]:
        """The collection's image folders (real paths)."""
        return [os.path.realpath(r) for r in self.collection.manifest.get("roots", [])]

    # --- what the browser may get ------------------------------------------------------------
    @property
    def served_dirs(self) -> list[str]:
        """The only folder files are served from (``allowed_paths``): the thumbnails."""
        return [os.path.realpath(self.thumbs)]

    def blocked_paths(self) -> list[str]:
        """The collection's own files (database, index, manifest, probes, labels). Gradio checks
        these before anything it would serve, so they stay private even when the collection lies
        inside an image folder or in the temp directory."""
        names = {*PRIVATE_FILES, *(p.name for p in self.path.iterdir())} - {"thumbs"}
        return sorted(os.path.realpath(self.path / name) for name in names)

    def shown_file(self, path: str, meta: dict[str, Any]) -> str | None:
        """The file to show for the indexed image at ``path`` (``meta``: its sha256, width and
        height): a thumbnail in ``served_dirs``, or None when none can be made. Callers pass
        rows the server looked up itself, never a path or record a client sent."""
        return thumbnail(
            self.thumbs, path, meta.get("sha256"), meta.get("width"), meta.get("height")
        )

    def is_served(self, path: str) -> bool:
        """Whether ``path`` resolves (symlinks followed) inside a served folder."""
        real = os.path.realpath(path)
        return any(is_within(real, d) for d in self.served_dirs)

    def check_index_folder(self, folder: str) -> Path:
        """``folder`` as a real path when the UI may index it, else ``PermissionError``.

        A collection's existing roots may always be refreshed; any other folder only when it is
        (or lies below) one given to ``--allow-index``: indexing a folder makes its images
        searchable and shown to everyone who can reach the UI.
        """
        real = os.path.realpath(Path(folder).expanduser())
        if real in self.roots() or any(is_within(real, d) for d in self.allow_index):
            if not os.path.isdir(real):
                raise ValueError(f"Not a folder: {folder}")
            return Path(real)
        allowed = ", ".join(self.allow_index) if self.allow_index else "none"
        raise PermissionError(
            f"Indexing {folder} from the web UI is not allowed (folders allowed: {allowed}). "
            "Start the server with --allow-index DIR to allow DIR and the folders below it, "
            "or run: moco-search index DIR --collection " + str(self.path)
        )

    # --- classifier --------------------------------------------------------------------------
    def classifier(self, name: str) -> Any:
        """A cached ``indexes.classify.Classifier``: a probe by name, or ``"knn"``; made again
        when the collection was re-indexed, or the probe retrained, since (by any process:
        ``moco-search probe train`` beside a running UI kept its old probe until a restart)."""
        from indexes.classify import Classifier
        from indexes.probes import probe_version

        self.collection.follow_index_runs()
        knn = name == "knn"
        source = None if knn else probe_version(self.collection, name)
        made_from = (self.collection.loads, source)
        with self._lock:
            cached = self._classifiers.get(name)
            if cached is None or cached[0] != made_from:
                clf = Classifier(
                    self.collection,
                    name=name,
                    knn=knn,
                    knn_k=min(KNN_K, max(1, len(self.collection))),
                )
                self._classifiers[name] = cached = (made_from, clf)
            return cached[1]

    def forget_classifiers(self) -> None:
        """Drop cached classifiers after a probe is retrained or labels change."""
        with self._lock:
            self._classifiers.clear()

    # --- labels given in the UI --------------------------------------------------------------
    def user_labels(self) -> dict[int, str]:
        """Labels given in the UI, kept in the collection's database (``probe train`` and kNN
        see them too; the indexer's own labels stay untouched)."""
        self._import_json_labels()
        return self.collection.user_labels()

    def set_user_label(self, image_id: int, label: str | None) -> dict[int, str]:
        """Label (or with None, unlabel) one image; return every label given in the UI."""
        self._import_json_labels()
        return self.collection.set_user_labels({int(image_id): label})

    def _import_json_labels(self) -> None:
        """Labels an earlier version kept in ``app_labels.json`` move into the database once."""
        old = self.path / USER_LABELS
        if not old.is_file():
            return
        with self._lock:
            if not old.is_file():
                return
            labels = {int(k): str(v) for k, v in json.loads(old.read_text()).items()}
            known = self.collection.known_ids(labels)
            self.collection.set_user_labels({i: v for i, v in labels.items() if i in known})
            old.unlink()
            log.info("moved %d labels from %s into the collection's database", len(labels), old)

    # --- background indexing -----------------------------------------------------------------
    def start_index(self, folder: str | None) -> IndexJob:
        """Index ``folder`` (or re-scan the roots) in a thread; searches keep using the old index
        until the run has finished and ``Collection.reload`` swaps the new one in."""
        from indexes import index_images

        with self._lock:
            if self.job is not None and not self.job.finished:
                raise ValueError(f"An index run is already going on ({self.job.folder})")
            if not (self.path / MANIFEST_NAME).is_file():  # the run would make it anew
                raise ValueError(f"Collection {self.path} is gone (deleted or moved?)")
            roots = [self.check_index_folder(folder)] if folder else []
            job = IndexJob(folder=str(roots[0]) if roots else "the collection's folders")
            self.job = job

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        def run() -> None:
            try:
                report = index_images(  # a symlink in an allowed folder leads nowhere else
                    roots, self.path, progress=progress, workers=0, confine=self.allow_index
                )
                self.collection.reload()
                self.forget_classifiers()
                job.message = "Done: " + report.summary()
            except ValueError as e:  # a refusal (the command line is indexing it, a folder
                # found empty), not a fault: one line in the log, no traceback
                log.warning("%s", e)
                job.message = f"Index run refused: {e}"
            except Exception as e:  # shown in the UI; the server keeps serving
                log.exception("index run failed")
                job.message = f"Index run failed: {e}"
            finally:
                job.finished = True

        threading.Thread(target=run, name="moco-search-index", daemon=True).start()
        return job
