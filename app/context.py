"""``AppContext``: what the web UI holds while it serves one collection.

The UI is built around one opened ``Collection`` plus the few things that change while it runs:
the classifier in use (rebuilt after a probe is retrained), labels typed into the UI, and at most
one background index run. Everything is passed to ``build_demo`` explicitly; nothing is global.
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

from app.thumbnails import thumbs_dir
from indexes import Collection

log = logging.getLogger(__name__)
USER_LABELS = "app_labels.json"
"""Labels given in the UI, kept beside the collection (the indexer's labels stay untouched)."""
USER_PROBE = "ui"


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

    def __init__(self, collection: Collection, example: str | None = None) -> None:
        self.collection = collection
        self.example = example
        self._lock = threading.Lock()
        self._classifiers: dict[str, Any] = {}
        self.job: IndexJob | None = None
        self.allowed_paths: list[str] = [*self.roots(), os.path.realpath(thumbs_dir(self.path))]
        """Handed to ``launch(allowed_paths=...)`` as this very list, so a folder added later is
        served too (Gradio reads the list on each request). The collection's thumbnails too."""

    @classmethod
    def open(cls, path: str | os.PathLike, device: str = "cpu",
             example: str | None = None) -> AppContext:
        return cls(Collection.open(path, device=device), example=example)

    @property
    def path(self) -> Path:
        return self.collection.path

    def roots(self) -> list[str]:
        """The collection's image folders: the only places files are served from."""
        return [os.path.realpath(r) for r in self.collection.manifest.get("roots", [])]

    # --- classifier --------------------------------------------------------------------------
    def classifier(self, name: str) -> Any:
        """A cached ``indexes.classify.Classifier``: a probe by name, or ``"knn"``."""
        from indexes.classify import Classifier

        with self._lock:
            if name not in self._classifiers:
                knn = name == "knn"
                self._classifiers[name] = Classifier(self.collection, name=name, knn=knn,
                                                     knn_k=min(200, max(1, len(self.collection))))
            return self._classifiers[name]

    def forget_classifiers(self) -> None:
        """Drop cached classifiers after a probe is retrained or labels change."""
        with self._lock:
            self._classifiers.clear()

    # --- labels given in the UI --------------------------------------------------------------
    def user_labels(self) -> dict[int, str]:
        p = self.path / USER_LABELS
        if not p.is_file():
            return {}
        return {int(k): str(v) for k, v in json.loads(p.read_text()).items()}

    def set_user_label(self, image_id: int, label: str | None) -> dict[int, str]:
        """Label (or with None, unlabel) one image; written atomically."""
        with self._lock:
            labels = self.user_labels()
            if label:
                labels[int(image_id)] = label
            else:
                labels.pop(int(image_id), None)
            tmp = self.path / (USER_LABELS + ".tmp")
            tmp.write_text(json.dumps({str(k): v for k, v in sorted(labels.items())}, indent=1))
            os.replace(tmp, self.path / USER_LABELS)
            return labels

    # --- background indexing -----------------------------------------------------------------
    def start_index(self, folder: str | None) -> IndexJob:
        """Index ``folder`` (or re-scan the roots) in a thread; searches keep using the old index
        until the run has finished and ``Collection.reload`` swaps the new one in."""
        from indexes import index_images

        with self._lock:
            if self.job is not None and not self.job.finished:
                raise ValueError(f"An index run is already going on ({self.job.folder})")
            roots = [Path(folder).expanduser()] if folder else []
            for r in roots:
                if not r.is_dir():
                    raise ValueError(f"Not a folder: {r}")
            job = IndexJob(folder=str(roots[0]) if roots else "the collection's folders")
            self.job = job

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        def run() -> None:
            try:
                report = index_images(roots, self.path, progress=progress, workers=0)
                self.collection.reload()
                self.allowed_paths.extend(r for r in self.roots() if r not in self.allowed_paths)
                self.forget_classifiers()
                job.message = "Done: " + report.summary()
            except Exception as e:  # shown in the UI; the server keeps serving
                log.exception("index run failed")
                job.message = f"Index run failed: {e}"
            finally:
                job.finished = True

        threading.Thread(target=run, name="moco-search-index", daemon=True).start()
        return job
