"""``Collection``: the read side of a collection directory (search, records, vectors, labels).

Opening is cheap: the manifest, a SQLite connection and the FAISS index, memory-mapped where
possible (an IVF index reads only its centroids; its lists stay in the file and the page
cache). The encoder is loaded on the first query that needs pixels embedded, so search by id
and metadata access never pay for it. With a GPU, unfiltered searches run on a GPU copy.
One lock guards the SQLite connection and the lazy model; FAISS searches run outside it, so
concurrent searches from UI threads are safe.

A collection stays open for as long as a UI server runs, while ``moco-search index`` (a nightly
job) changes it underneath. Each search therefore first checks, with one ``stat``, whether an
index run has replaced the manifest since the last ``reload`` and reloads if so; and a hit whose
row a run still in progress has deleted makes it reconcile the index with the database in memory
and search again. Without this, the first search after a run that removed files raised
``KeyError: Unknown image ids`` until the server was restarted, and new images never showed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from indexes import gpu, manifest, store, switch, sync, vectors
from indexes.filters import Filters, allowed_ids, filtered_knn
from indexes.store import Record
from moco import EncoderConfig, file_identity, read_encoder_config

log = logging.getLogger(__name__)

FILTER_CACHE = 16
"""Filters whose matching ids are kept between searches (a UI repeats the same few)."""
NEGATIVE_WEIGHT = 0.5
Query = str | os.PathLike | bytes | Image.Image | int | np.ndarray


@dataclass(frozen=True)
class Hit:
    """One search result; ``score`` is the cosine similarity to the query."""

    id: int
    score: float
    path: str
    root: str
    relpath: str
    label: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, r: Record, score: float) -> Hit:
        return cls(r.id, score, r.path, r.root, r.relpath, r.label, r.meta())


class EncoderMissing(FileNotFoundError):
    """The collection's encoder is not where its manifest says: ``Collection.encoder_missing``."""


class Collection:
    """A collection directory opened for search. Use ``Collection.open(path)``."""

    def __init__(self, path: Path, device: str | None = "cpu", encoder: Path | None = None) -> None:
        self.path = Path(path)
        self.device = device
        if device not in (None, "cpu"):  # a bad --device, said before any work
            from indexes.embed import default_device  # torch: see ``embed``

            self.device = default_device(device)
        self._lock = threading.RLock()
        self._db = store.open_store(self.path / store.DB_NAME, create=False)
        # pages read through a map, not a read() call each: a hit's row cost 2x cold without
        self._db.execute(f"PRAGMA mmap_size={store.MMAP_BYTES}")
        self._encoder_dir = encoder
        self._model: Any = None
        self._model_lock = threading.Lock()
        self._encoder_changes = 0
        """How many times a reload found another encoder: a load begun before one is dropped."""
        self._transform: Any = None
        self._filter_cache: dict[tuple[Any, ...], np.ndarray] = {}
        self._counts: dict[str, tuple[tuple[int, int], list[Any]]] = {}
        self.loads = 0
        """How many times manifest and index were (re)loaded: what a cache of them is keyed on."""
        self.reload()
        if encoder is not None or Path(self.manifest["encoder"]["path"]).is_dir():
            self._check_encoder()

    @classmethod
    def open(
        cls, path: str | os.PathLike, device: str = "cpu", encoder: str | os.PathLike | None = None
    ) -> Collection:
        """Open ``path``; ``encoder`` overrides the manifest's path (same content hash needed)."""
        path = Path(path)
        manifest.read_manifest(path)  # a clear error for a non-collection
        return cls(path, device, Path(encoder) if encoder else None)

    def reload(self, running: bool = False) -> None:
        """Re-read manifest and index, to pick up a finished index run (or, ``running``, to
        follow one in progress: ``sync.open_index`` reconciles the index in memory)."""
        with self._lock:
            self.loads += 1
            before = getattr(self, "manifest", None)
            self.manifest, self._seen = switch.read_adopted(self.path, self._db)
            if before is not None and not switch.same_entry(
                before["encoder"], self.manifest["encoder"]
            ):  # re-embedded (``index --reembed``): queries need the new encoder too
                log.info("%s was re-embedded by another encoder: using it", self.path)
                self._model, self._encoder_dir = None, None
                self._encoder_changes += 1
            self.encoder_config = EncoderConfig.from_dict(self.manifest["encoder"]["config"])
            self.dim = int(self.manifest["feature_dim"])
            self._params = dict(self.manifest.get("index", {}).get("params", {}))
            self._exact = self.manifest.get("index", {}).get("factory", "Flat") == "Flat"
            self._index = sync.open_index(
                self.path, self._db, self.manifest, mmap=True, running=running
            )
            self._gpu = gpu.to_gpu(self._index) if vectors.is_ivf(self._index) else self._index
            self._filter_cache.clear()
            self._counts.clear()

    def follow_index_runs(self) -> None:
        """Reload if an index run (of any process) has replaced the manifest since the last
        ``reload``: the run writes it last, so then its rows and ``index.faiss`` are whole.
        Searches call it; whoever caches what it derived from the collection (a kNN
        classifier's labelled vectors) calls it too, and rebuilds when ``loads`` moved."""
        if file_identity(self.path / manifest.MANIFEST_NAME) != self._seen:
            with self._lock:
                if file_identity(self.path / manifest.MANIFEST_NAME) != self._seen:
                    log.info("%s was re-indexed: reloading it", self.path)
                    self.reload()

    def close(self) -> None:
        self._db.conn.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._cached("SELECT count(*) FROM vectors")[0][0])

    def _db_version(self) -> tuple[int, int]:
        """Moves whenever the database may have changed: ``data_version`` when another
        connection commits (an index run), ``total_changes`` when this one writes. The caches
        of values derived from it (filtered ids, counts) are keyed on it."""
        return self._db.execute("PRAGMA data_version").fetchone()[0], self._db.conn.total_changes

    def _cached(self, sql: str) -> list[Any]:
        """The rows of ``sql``, queried again only once the database has changed: a page load
        asks for the size and the label counts five times, each a scan of every row (60 ms each
        at 300k images)."""
        with self._lock:
            version, hit = self._db_version(), self._counts.get(sql)
            if hit is None or hit[0] != version:
                hit = self._counts[sql] = (version, self._db.execute(sql).fetchall())
            return hit[1]

    # --- embedding -------------------------------------------------------------------------
    def _encoder_path(self) -> Path:
        return self._encoder_dir or Path(self.manifest["encoder"]["path"])

    def encoder_missing(self) -> str | None:
        """Why a new image cannot be embedded, when the encoder is not where the manifest says
        (moved or deleted), else None. Stored vectors need no encoder: searching by id,
        browsing and the probe's stored features work without it."""
        path = self._encoder_path()
        if path.is_dir():
            return None
        return (
            f"The encoder of collection {self.path} is not at {path} (moved or deleted?): "
            "embedding a new image needs it. If it moved, `moco-search index --collection "
            f"{self.path} --encoder DIR` records where (nothing is embedded again)"
        )

    def _check_encoder(self) -> None:
        path = self._encoder_path()
        manifest.check_encoder(self.manifest, read_encoder_config(path), path, self.path)

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """Embeddings (N x D float32, unit norm) of paths, bytes or PIL images, as indexed.

        The first call imports torch (seconds) and loads the encoder: opening a collection,
        searching by id, ``info`` and everything read from the stored vectors never wait for
        either."""
        from indexes import embed

        self.follow_index_runs()  # re-embedded meanwhile: the new encoder, not a loaded one
        model, transform = self._loaded_encoder()
        draft = embed.draft_size(self.encoder_config)
        decoded = [embed.prepare(im, transform, draft) for im in images]
        if not decoded:
            return np.zeros((0, self.dim), dtype=np.float32)
        return embed.embed_decoded(model, decoded, self.device)

    def _loaded_encoder(self) -> tuple[Any, Any]:
        """The encoder and its transform, loaded on first use (torch imported with it).

        Loaded under a lock of its own: the seconds it takes do not hold ``_lock``, which every
        read of the database takes (a page served meanwhile would wait for torch). An encoder
        that a reload replaced while it loaded is dropped and the new one loaded."""
        from indexes import embed
        from moco import eval_transform

        with self._model_lock:
            while True:
                with self._lock:
                    if self._model is not None:
                        return self._model, self._transform
                    path, changes = self._encoder_path(), self._encoder_changes
                    if not path.is_dir():
                        raise EncoderMissing(self.encoder_missing())
                    self._check_encoder()
                device = embed.default_device(self.device)  # None: a GPU if there is one
                model, cfg = embed.load_model(path, device)
                with self._lock:
                    if changes == self._encoder_changes:  # else loop: load the new one
                        self.device, self._model = device, model
                        self._transform = eval_transform(cfg)

    def warm(self) -> None:
        """Import torch and load the encoder now, so that the first search by image does not
        wait for them (3 to 4 s): the web UI calls it in the background once its page is
        served. A fault is logged, not raised: the search that needs the encoder says it."""
        if self.encoder_missing():  # said when the collection was opened
            return
        try:
            self._loaded_encoder()
        except Exception as e:  # said again, to the user, by the search that needs it
            log.warning(
                "The encoder of %s cannot be loaded: %s (a search by a new image fails until "
                "it can)",
                self.path,
                e,
            )

    def query_vector(
        self,
        query: Query | Sequence[Query],
        negatives: Sequence[Query] = (),
        negative_weight: float = NEGATIVE_WEIGHT,
    ) -> np.ndarray:
        """mean(positives) - w * mean(negatives), renormalised (Rocchio); ints are stored ids."""
        self.follow_index_runs()  # before ``dim`` and stored vectors are used
        pos = list(query) if isinstance(query, (list, tuple)) else [query]
        if not pos:
            raise ValueError("A search needs at least one positive example")
        q = self._as_vectors(pos).mean(axis=0)
        if negatives:
            q = q - negative_weight * self._as_vectors(list(negatives)).mean(axis=0)
        norm = float(np.linalg.norm(q))
        if norm < 1e-6:
            raise ValueError("Positive and negative examples cancel out; nothing to search for")
        return (q / norm).astype(np.float32)

    def _as_vectors(self, items: list[Any]) -> np.ndarray:
        out = np.empty((len(items), self.dim), dtype=np.float32)
        ids = [j for j, x in enumerate(items) if isinstance(x, (int, np.integer))]
        arrays = [j for j, x in enumerate(items) if isinstance(x, np.ndarray)]
        pixels = [j for j in range(len(items)) if j not in set(ids) | set(arrays)]
        if ids:
            out[ids] = self.vectors([items[j] for j in ids])
        for j in arrays:
            v = np.asarray(items[j], dtype=np.float32).reshape(self.dim)
            out[j] = v / max(float(np.linalg.norm(v)), 1e-12)
        if pixels:
            out[pixels] = self.embed([items[j] for j in pixels])
        return out

    # --- search ----------------------------------------------------------------------------
    def search(
        self,
        query: Query | Sequence[Query],
        k: int = 10,
        *,
        negatives: Sequence[Query] = (),
        filters: Filters | None = None,
        min_score: float | None = None,
    ) -> list[Hit]:
        """Nearest images to ``query`` (path, bytes, PIL image, id, vector, or a list of them)."""
        return self.search_vector(
            self.query_vector(query, negatives), k, filters=filters, min_score=min_score
        )

    def search_id(self, id: int, k: int = 10, *, filters: Filters | None = None) -> list[Hit]:
        """Nearest images to the stored image ``id`` (itself first, at score 1)."""
        if not self.known_ids([id]):  # an unknown id, or a file recorded as unreadable
            raise ValueError(f"No image with id {id} in {self.path}")
        return self.search_vector(self.vectors([id])[0], k, filters=filters)

    def search_vector(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        filters: Filters | None = None,
        min_score: float | None = None,
    ) -> list[Hit]:
        """Nearest images to a unit-norm ``vector`` of this collection's encoder."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.follow_index_runs()
        q = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        try:
            return self._search_vector(q, k, filters, min_score)
        except KeyError:  # a run in progress deleted rows the loaded index still holds
            with self._lock:
                self.reload(running=True)  # reconciles the index with the database, by id sets
            return self._search_vector(q, k, filters, min_score)

    def _search_vector(
        self, q: np.ndarray, k: int, filters: Filters | None, min_score: float | None
    ) -> list[Hit]:
        allowed = self._allowed(filters)
        index = self._gpu if allowed is None else self._index  # GPU indexes take no selector
        found = filtered_knn(index, q, k, self._params, allowed, self.vectors, self._exact)
        if min_score is not None:
            found = [(i, s) for i, s in found if s >= min_score]
        recs = self.records([i for i, _ in found])
        return [Hit.from_record(r, s) for r, (_, s) in zip(recs, found, strict=True)]

    def _allowed(self, filters: Filters | None) -> np.ndarray | None:
        """The ids passing ``filters`` (None: no filter), cached until the database changes.

        Selecting 100k ids of 1M rows takes ~40 ms in SQLite, 40x a search: a UI repeating a
        label filter should not pay it each time.
        """
        if filters is None or filters.is_empty():
            return None
        with self._lock:
            key = (filters, *self._db_version())
            ids = self._filter_cache.get(key)
            if ids is None:
                ids = allowed_ids(self._db, filters)
                if len(self._filter_cache) >= FILTER_CACHE:
                    self._filter_cache.pop(next(iter(self._filter_cache)))
                self._filter_cache[key] = ids
            return ids

    # --- metadata and vectors --------------------------------------------------------------
    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The exact stored embeddings of ``ids`` (N x D), whatever the FAISS index type."""
        with self._lock:
            return store.get_vectors(self._db, list(np.asarray(ids).reshape(-1)), self.dim)

    def records(self, ids: Sequence[int] | np.ndarray) -> list[Record]:
        with self._lock:
            return store.get_records(self._db, list(np.asarray(ids).reshape(-1)))

    def query_records(self, where: str, params: Sequence[Any] = ()) -> list[Record]:
        """Rows matching a SQL condition on ``images`` (parameterised), in id order."""
        with self._lock:
            return store.query_records(self._db, where, params)

    def labeled(self) -> tuple[np.ndarray, list[str]]:
        """Ids and labels of the labelled indexed images, in id order: the indexer's labels
        (folder names, ``--labels``), overridden and extended by those given in the web UI."""
        with self._lock:
            rows = dict(
                self._db.execute(
                    "SELECT id, label FROM images WHERE status = 'ok' AND label IS NOT NULL"
                ).fetchall()
            )
            rows.update(store.user_labels(self._db))
        ids = sorted(rows)
        return np.array(ids, dtype=np.int64), [rows[i] for i in ids]

    def known_ids(self, ids: Iterable[int]) -> set[int]:
        """Those of ``ids`` that are indexed images (status ok)."""
        wanted = sorted({int(i) for i in ids})
        with self._lock:
            return {
                r[0]
                for r in self._db.execute(
                    "SELECT value FROM json_each(?) JOIN images ON images.id = value "
                    "WHERE images.status = 'ok'",
                    [json.dumps(wanted)],
                ).fetchall()
            }

    def user_labels(self) -> dict[int, str]:
        """Labels given in the web UI, by image id."""
        with self._lock:
            return store.user_labels(self._db)

    def set_user_labels(self, labels: dict[int, str | None]) -> dict[int, str]:
        """Label images (``None`` removes a label) in the database; return all UI labels."""
        import time

        if missing := sorted(set(map(int, labels)) - self.known_ids(labels)):
            raise ValueError(f"No image with id {missing[0]} in {self.path}")
        with self._lock:
            try:
                store.set_user_labels(self._db, labels, time.time())
            except sqlite3.OperationalError as e:
                raise PermissionError(
                    f"Collection {self.path} cannot be written ({e}): the label was not saved"
                ) from None
            return store.user_labels(self._db)

    def predictions(self) -> list[tuple[Any, ...]]:
        """``classify-all``'s stored (id, label, confidence, top5 JSON, method) rows, those made
        with this collection's encoder (``store.read_predictions``)."""
        self.follow_index_runs()
        with self._lock:
            return store.read_predictions(self._db, self.manifest["encoder"]["content_hash"])

    def replace_predictions(self, rows: Sequence[tuple[Any, ...]]) -> None:
        with self._lock:
            store.replace_predictions(self._db, rows)

    def label_counts(self) -> dict[str, int]:
        return dict(
            self._cached(
                "SELECT label, count(*) FROM images WHERE status = 'ok' AND label IS NOT NULL "
                "GROUP BY label ORDER BY label"
            )
        )

    def errors(self) -> list[Record]:
        """Files that could not be indexed, each with its ``reason``."""
        return self.query_records("images.status = 'error'")

    def duplicates(self, threshold: float = 0.95) -> list[list[Hit]]:
        """Groups of near-identical images and exact copies (largest first): each led by the
        image with most near-duplicates, every member's score its cosine to the leader, none
        below ``threshold`` (``indexes.duplicates``)."""
        from indexes.duplicates import near_pairs, star_groups

        if not threshold > 0:  # -5 grouped every image (above 1: the exact copies alone)
            raise ValueError(f"threshold must be above 0 (a cosine similarity), got {threshold}")
        self.follow_index_runs()
        with self._lock:
            chunks = list(store.iter_vectors(self._db, self.dim, chunk=8192))
            copies = self._db.execute(
                "SELECT id, duplicate_of FROM images WHERE status = 'duplicate' "
                "AND duplicate_of IS NOT NULL"
            ).fetchall()
            index, params = self._index, self._params

        def search(vecs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
            return vectors.knn(index, vecs, k, params)

        groups = star_groups(near_pairs(chunks, search, threshold), copies)
        out = []
        for g in groups:
            recs = {r.id: r for r in self.records(g.ids)}
            out.append([Hit.from_record(recs[i], s) for i, s in g.members])
        return out

    def resolve_path(self, id: int) -> Path:
        """The absolute path of image ``id``; refused if it would lie outside its root."""
        r = self.records([id])[0]
        path = os.path.normpath(r.path)
        root = os.path.normpath(r.root)
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"Path of image {id} lies outside its root {root}")
        return Path(path)
