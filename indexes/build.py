"""``index_images``: folders -> a collection (SQLite rows + exact vectors, FAISS index, manifest).

The run is read -> embed -> write (clip-retrieval's runner): scan and diff against the database
(``plan``), apply renames, deletions and metadata refreshes, then decode and embed the new and
changed files in batches, committing each batch (rows and vectors together) in one transaction.
Killed at any point, a re-run finds the committed batches unchanged and carries on; the FAISS
file is brought up to date from the stored vectors at the end (``sync``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from indexes import (
    budget,
    faults,
    folders,
    manifest,
    plan,
    preflight,
    runlock,
    scan,
    store,
    switch,
    sync,
    vectors,
)
from indexes.scan import FileEntry
from moco import EncoderConfig, heif_hint, read_encoder_config

if TYPE_CHECKING:
    from indexes.embed import Decoded

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class IndexReport:
    """What an index run did; ``errors`` counts files recorded with status=error, by reason.

    ``skipped`` counts the files passed over for their extension, by extension. ``total`` and
    ``duplicates`` describe the collection after the run (its images, and the exact copies of them
    it holds besides), so a re-run that changes nothing reports what an earlier run found.
    """

    added: int = 0
    updated: int = 0
    removed: int = 0
    renamed: int = 0
    unchanged: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    total: int = 0
    duplicates: int = 0
    index: dict = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    hidden: int = 0
    """Hidden files and folders passed over (``.thumbnails``, ``@eaDir``, ``._IMG.jpg``)."""
    first_hidden: str | None = None
    reembedded: int = 0
    """Images given a vector by a new encoder (``--reembed``), ids and labels kept."""

    def summary(self) -> str:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        copies = f"{self.duplicates} exact cop{'y' if self.duplicates == 1 else 'ies'}"
        return (
            f"{self.total} images in the collection, {copies} besides ({self.added} new, "
            f"{self.updated} updated, {self.renamed} renamed, {self.removed} removed, "
            f"{self.unchanged} unchanged) in {self.seconds:.1f}s; errors: {errs}"
            + self._skipped()
            + self._hidden()
            + (f"; {self.reembedded} re-embedded with the new encoder" if self.reembedded else "")
        )

    def _hidden(self) -> str:
        """``; 2 hidden files or folders passed over (first: @eaDir)``."""
        if not self.hidden:
            return ""
        what = "file or folder" if self.hidden == 1 else "files or folders"
        first = store.printable(self.first_hidden or "")
        return f"; {self.hidden} hidden {what} passed over (first: {first})"

    def _skipped(self) -> str:
        """``; 3 files skipped: unsupported type .psd`` (with counts when several types)."""
        n = sum(self.skipped.values())
        if not n:
            return ""
        if len(self.skipped) == 1:
            kinds = f"type {next(iter(self.skipped))}"
        else:
            kinds = "types " + ", ".join(f"{ext} ({c})" for ext, c in self.skipped.items())
        hint = heif_hint(self.skipped)  # iPhone photos: say how to get them
        return f"; {n} file{'s' if n > 1 else ''} skipped: unsupported {kinds}{hint}"


def _insert(
    db: store.Database,
    rid: int,
    e: FileEntry,
    d: Decoded,
    vec: object,
    now: float,
    report: IndexReport,
    dtype: str = "float32",
) -> None:
    """One row (and its vector when it is a new, unique image)."""
    status, dup = ("error", None) if d.reason else ("ok", None)
    if status == "ok":
        row = db.execute(
            "SELECT id FROM images WHERE sha256 = ? AND status = 'ok' LIMIT 1", [d.sha256]
        ).fetchone()
        if row:
            status, dup = "duplicate", row[0]
    else:
        report.errors[d.reason] = report.errors.get(d.reason, 0) + 1
    mtime = e.mtime_ns / 1e9 if e.mtime_ns is not None else None
    cur = db.execute(
        "INSERT INTO images (root_id, relpath, relpath_raw, size, mtime_ns, mtime, sha256, width, "
        "height, format, label, status, reason, duplicate_of, indexed_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            rid,
            store.display(e.relpath_raw),
            e.relpath_raw,
            e.size,
            e.mtime_ns,
            mtime,
            d.sha256,
            d.width,
            d.height,
            d.format,
            e.label,
            status,
            d.reason,
            dup,
            now,
        ],
    )
    if status == "ok":
        db.execute(
            "INSERT INTO vectors (id, v) VALUES (?, ?)", [cur.lastrowid, store.to_blob(vec, dtype)]
        )


def commit_batch(
    db: store.Database,
    items: list[tuple[FileEntry, int | None]],
    decoded: list[Decoded],
    vecs: object,
    root_ids: dict[str, int],
    report: IndexReport,
) -> None:
    """Replace/insert the rows of one batch and their vectors in a single transaction."""
    now = time.time()
    good = iter(vecs)  # N_good x D, in item order
    dtype = store.vector_dtype(db)
    with store.transaction(db):
        for (e, old), d in zip(items, decoded, strict=True):
            if old is not None:
                store.delete_rows(db, [old])
                report.updated += 1
            else:
                report.added += 1
            _insert(
                db,
                root_ids[e.root],
                e,
                d,
                next(good) if d.tensor is not None else None,
                now,
                report,
                dtype,
            )
        store.bump_generation(db)


def _apply_moves(db: store.Database, p: plan.Plan, root_ids: dict[str, int]) -> None:
    with store.transaction(db):
        for i, e in p.renames:
            db.execute(
                "UPDATE images SET root_id=?, relpath=?, relpath_raw=?, mtime_ns=?, "
                "mtime=?, label=? WHERE id=?",
                [
                    root_ids[e.root],
                    store.display(e.relpath_raw),
                    e.relpath_raw,
                    e.mtime_ns,
                    e.mtime_ns / 1e9,
                    e.label,
                    i,
                ],
            )
        store.delete_rows(db, p.delete)
        for i, e in p.touch:
            db.execute(
                "UPDATE images SET size=?, mtime_ns=?, mtime=?, label=? WHERE id=?",
                [e.size, e.mtime_ns, e.mtime_ns / 1e9, e.label, i],
            )
        if p.delete:
            store.bump_generation(db)


@dataclass(frozen=True)
class FolderOptions:
    """What a run may do to the collection's folders and labels before its scan: ``index``'s
    flags of the same names, as ``index_images`` documents them."""

    allow_empty: bool = False
    folder_labels: bool = False
    move_root: tuple[Path, Path] | None = None
    forget_root: Path | None = None
    confine: tuple[str, ...] = ()


@dataclass
class Run:
    """An index run between its plan and its end (shared with the distributed runner)."""

    collection: Path
    db: store.Database
    encoder: Path
    cfg: EncoderConfig
    names: list[str]
    root_ids: dict[str, int]
    old: dict | None
    plan: plan.Plan
    report: IndexReport
    t0: float
    model: Any = None
    """The encoder, when ``start_run`` loaded it already (to check it before a first write)."""
    max_index_memory: int | None = None
    """Bytes the ``auto`` index may take (None: the collection's last budget, or the default)."""
    labels_csv: str | None = None
    """The labels CSV the manifest remembers for later runs (absolute), if any."""


def start_run(
    roots: list[Path],
    collection: Path,
    encoder: Path | None,
    labels_csv: Path | None,
    *,
    index_type: str = "auto",
    device: str | None = None,
    max_index_memory: int | None = None,
    vector_dtype: str | None = None,
    options: FolderOptions = FolderOptions(),
    switching: bool = False,
) -> Run:
    """Check everything, then scan, diff, and apply renames, deletions and refreshes.

    Nothing is written before the folders, the collection path, the index type and the encoder
    are checked. A new collection, or one holding no vectors (which may be re-bound to another
    encoder), has its encoder loaded first: a broken encoder must not leave a collection bound
    to it behind, refusing the right one from then on. The one exception: ``options.move_root``
    and ``forget_root`` are done first, each whole on its own (``indexes.folders``; the same
    command again after a later check failed finds the move done). A root that holds no image
    file now but
    indexed images before is refused unless ``options.allow_empty``
    (``preflight.check_not_emptied``). ``switching``: ``encoder`` is about to replace the
    collection's (``switch``), so it is neither refused nor bound here.
    """
    move_root, forget_root = options.move_root, options.forget_root
    t0 = time.perf_counter()
    collection = Path(collection)
    preflight.check_collection(collection)
    switch.finish_switch(collection)
    known = (collection / manifest.MANIFEST_NAME).is_file()
    old = manifest.read_manifest(collection) if known else None
    if (move_root or forget_root) and old is None:
        raise ValueError("--move-root and --forget-root change a collection that exists")
    forgotten = 0
    if move_root:
        old = folders.move_root(collection, old, *move_root)
    if forget_root:
        old, forgotten = folders.forget_root(collection, old, forget_root)
    kept: list[str] = []
    if old is None and encoder is not None:  # a database without its manifest, or a new one
        kept = preflight.check_manifest_kept(collection, encoder)
    given = list(roots) or [Path(r) for r in kept]  # the lost manifest's folders: its images'
    names, encoder = preflight.resolve(given, collection, encoder, old, bool(forget_root))
    cfg = read_encoder_config(encoder)
    if index_type != "auto":
        vectors.new_index(index_type, cfg.feature_dim)  # a bad factory string fails here
    if vector_dtype is not None and vector_dtype not in store.VECTOR_DTYPES:
        raise ValueError(
            f"Unknown vector dtype {vector_dtype!r}; valid: {', '.join(store.VECTOR_DTYPES)}"
        )
    labels_csv, keep_labels = preflight.labels_source(labels_csv, options.folder_labels, old)
    labels = scan.read_labels(labels_csv, names) if labels_csv else None
    if keep_labels:  # gone for now: remembered still, for when it is back
        remember = (old or {}).get("labels_csv")
    else:
        remember = os.path.abspath(labels_csv) if labels_csv else None
    bind = old is None or not manifest.same_encoder(old, cfg)
    if old is not None and bind and preflight.vector_count(collection):
        if switching:
            bind = False
        else:
            manifest.check_encoder(old, cfg, encoder, collection)  # raises: another's vectors
    model = _load_model(encoder, _device(device)) if bind else None
    collection.mkdir(parents=True, exist_ok=True)
    if old is not None and not (collection / store.DB_NAME).is_file():
        # the FAISS file holds the lost database's ids, which the new one hands out again:
        # kept, it answered with the old images' vectors under the new images' ids
        log.warning(
            "%s has no %s (deleted?): every image is indexed again, under new ids",
            collection,
            store.DB_NAME,
        )
        (collection / vectors.INDEX_NAME).unlink(missing_ok=True)
    if bind:  # name the encoder before the first vector is stored (crash safety)
        if old is not None:
            log.info("%s holds no vectors: binding it to encoder %s", collection, encoder)
        old = {
            **(old or {}),
            "encoder": manifest.encoder_entry(encoder, cfg),
            "feature_dim": cfg.feature_dim,
            "metric": "inner_product",
            "roots": sorted(set((old or {}).get("roots", [])) | set(names) | set(kept)),
            "index": {},
            "generation": None,
        }
        manifest.write_manifest(collection, old)
    elif old is not None and not set(names) <= set(old.get("roots", [])):
        # a folder new to the collection is named before its first row is stored, as a new
        # collection's are: killed while embedding it, a plain re-run (which scans the
        # manifest's folders) carries on instead of leaving its rows to no run at all
        old = {**old, "roots": sorted(set(old.get("roots", [])) | set(names))}
        manifest.write_manifest(collection, old)
    db = store.open_store(collection / store.DB_NAME)
    try:
        if not switching and (left := switch.unfinished(db)):
            log.warning(
                "%s holds %d vectors staged by an unfinished --reembed with encoder %s (%s): "
                "run that command again to finish it (searches use the collection's encoder "
                "until then), or --reembed with the collection's own encoder to discard them",
                collection,
                left[1],
                left[0]["content_hash"][:16],
                left[0]["path"],
            )
        switch.check_vectors_encoder(old, db)
        with store.transaction(db):
            root_ids = {r: store.root_id(db, r) for r in names}
            if store.read_info(db).get(store.ENCODER_HASH) != old["encoder"]["content_hash"]:
                store.write_info(db, **{store.ENCODER_HASH: old["encoder"]["content_hash"]})
        if vector_dtype is not None and vector_dtype != store.vector_dtype(db):
            n = store.set_vector_dtype(db, vector_dtype, cfg.feature_dim)
            log.info("%s: %d stored vectors converted to %s", collection, n, vector_dtype)
        found = scan.scan(names, labels.by_path if labels else None, options.confine)
        if labels and (unmatched := labels.unmatched(found.entries)):
            log.warning(
                "%s: %d of its %d rows name no image file under %s (first: %s); their labels are "
                "not applied",
                labels_csv,
                len(unmatched),
                len(labels.rows),
                ", ".join(names),
                unmatched[0],
            )
        rows = plan.existing_rows(db, root_ids)
        if not options.allow_empty:
            preflight.check_not_emptied(names, found.entries, rows)
        entries = found.entries
        if keep_labels:  # the CSV that gave them is gone: indexed images keep theirs
            entries = [
                dataclasses.replace(e, label=row.label)
                if (row := rows.get((e.root, e.relpath_raw)))
                else e
                for e in entries
            ]
        p = plan.make_plan(entries, rows)
        report = IndexReport(
            unchanged=p.unchanged,
            renamed=len(p.renames),
            removed=len(p.delete) + forgotten,  # --forget-root's count in the summary too
            skipped=found.skipped,
            hidden=len(found.hidden),
            first_hidden=found.hidden[0] if found.hidden else None,
        )
        _apply_moves(db, p, root_ids)
    except BaseException:
        db.conn.close()  # a refused run leaves no -wal or -shm beside the database
        raise
    return Run(
        collection,
        db,
        encoder,
        cfg,
        names,
        root_ids,
        old,
        p,
        report,
        t0,
        model,
        max_index_memory,
        remember,
    )


def finish_run(run: Run, index_type: str) -> IndexReport:
    """Bring the FAISS index up to date and write the manifest (last, atomically)."""
    db, report = run.db, run.report
    m = dict(run.old or {})
    m.update(
        encoder=manifest.encoder_entry(run.encoder, run.cfg),
        feature_dim=run.cfg.feature_dim,
        metric="inner_product",
        roots=sorted(set(m.get("roots", [])) | set(run.names)),
    )
    m.pop("labels_csv", None)
    if run.labels_csv:
        m["labels_csv"] = run.labels_csv
    m["index"] = sync.update_index(run.collection, db, m, index_type, run.max_index_memory)
    m["vector_dtype"] = store.vector_dtype(db)
    m["generation"] = store.generation(db)
    m["counts"] = store.status_counts(db)
    report.total = int(m["counts"].get("ok", 0))
    report.duplicates = int(m["counts"].get("duplicate", 0))
    report.index = m["index"]
    report.seconds = time.perf_counter() - run.t0
    m["last_run"] = {k: v for k, v in vars(report).items() if k != "index"}
    manifest.write_manifest(run.collection, m)
    db.conn.close()
    log.debug("%s", report.summary())  # the caller shows it (the CLI prints it once)
    return report


def index_images(
    roots: list[Path],
    collection: Path,
    encoder: Path | None = None,
    *,
    labels_csv: Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = None,
    index_type: str = "auto",
    max_index_memory: int | str | None = None,
    vector_dtype: str | None = None,
    allow_empty: bool = False,
    folder_labels: bool = False,
    move_root: tuple[Path, Path] | None = None,
    forget_root: Path | None = None,
    reembed: bool = False,
    confine: tuple[str | os.PathLike, ...] = (),
    progress: Progress | None = None,
) -> IndexReport:
    """Index the images under ``roots`` into ``collection``, incrementally and crash-safely.

    ``roots`` may be empty for an existing collection (re-scan its roots); ``encoder`` may be None
    then too (the manifest names it). A different encoder than the collection's is refused,
    unless the collection holds no vectors yet. A full disk raises ``CollectionError`` with
    every committed batch kept: re-running once space is freed carries on.

    ``index_type="auto"`` picks the most accurate index within ``max_index_memory`` (bytes or
    a size such as ``"2GB"``; see ``budget``). ``vector_dtype`` (float32 or float16) is how
    SQLite stores vectors from now on, the stored ones converted; None keeps the collection's.
    A root that held indexed images and now holds no image file at all (a drive not mounted, a
    folder moved) is refused with nothing removed, unless ``allow_empty``. A ``labels_csv`` is
    remembered and read again by later runs that give none, until ``folder_labels``.
    ``move_root=(old, new)`` points the images under folder ``old`` at ``new`` (moved: ids,
    vectors and labels kept) and ``forget_root`` removes a folder's images, before the scan.
    ``reembed`` embeds the collection's images again with ``encoder``, another than the one it
    was built with, keeping ids and labels (``switch``); killed, the same call carries on.
    ``confine`` (folders) keeps the files of roots inside them to them: one a symlink leads out
    of is recorded as an error, not indexed (``scan.scan``; the web UI's ``--allow-index``).
    """
    preflight.check_options(batch_size, workers)
    limit = budget.parse_bytes(max_index_memory) if max_index_memory is not None else None
    if device is not None:  # a wrong --device is said before any work
        device = _device(device)
    real = tuple(os.path.realpath(c) for c in confine)
    options = FolderOptions(allow_empty, folder_labels, move_root, forget_root, real)
    t0 = time.perf_counter()
    with faults.disk_full_reported(collection), runlock.held(collection):
        switched, model = 0, None
        if reembed:
            switched, model = _reembed(
                roots,
                Path(collection),
                encoder,
                labels_csv,
                options,
                device=_device(device),
                vector_dtype=vector_dtype,
                batch_size=batch_size,
                workers=_workers(workers),
                progress=progress,
            )
            if model is not None:  # folder moves done; the run below only adds what is new
                options = dataclasses.replace(options, move_root=None, forget_root=None)
        run = start_run(
            roots,
            collection,
            encoder,
            labels_csv,
            index_type=index_type,
            device=device,
            max_index_memory=limit,
            vector_dtype=vector_dtype,
            options=options,
        )
        run.report.reembedded = switched
        run.t0 = t0  # the summary's time includes the re-embedding
        try:
            if run.plan.todo:
                device = _device(device)  # as start_run and _reembed resolved it
                model = run.model if run.model is not None else model
                if model is None:
                    model = _load_model(run.encoder, device)
                _embed_todo(
                    run,
                    model,
                    batch_size=batch_size,
                    workers=_workers(workers),
                    device=device,
                    progress=progress,
                )
            return finish_run(run, index_type)
        finally:
            run.db.conn.close()


def _device(device: str | None) -> str:
    """``device``, or this process's GPU, or the CPU. torch is imported here and in
    ``_load_model``, when a run has images to embed: its import takes 3 s, and a run that finds
    nothing new (a nightly job) needs none."""
    from indexes import embed

    return embed.default_device(device)


def _load_model(encoder: Path, device: str) -> Any:
    """The encoder's network on ``device`` (torch imported here, as in ``_device``)."""
    from indexes import embed

    return embed.load_model(encoder, device)[0]


def _workers(workers: int | None) -> int:
    """``workers``, or the default decoding workers (asked when a run embeds, as ``_device``)."""
    from indexes import embed

    return embed.default_workers() if workers is None else workers


def commit_failed(run: Run) -> list[tuple[FileEntry, int | None]]:
    """Record files that failed ``stat``; return the rest of the to-do list (to decode)."""
    from indexes.embed import Decoded

    failed = [t for t in run.plan.todo if t[0].error]
    if failed:
        commit_batch(
            run.db,
            failed,
            [Decoded(None, reason=e.error) for e, _ in failed],
            [],
            run.root_ids,
            run.report,
        )
    return [t for t in run.plan.todo if not t[0].error]


def _embed_todo(
    run: Run,
    model: object,
    *,
    batch_size: int,
    workers: int,
    device: str,
    progress: Progress | None,
) -> None:
    """Decode + embed the to-do list in order and commit batch by batch.

    The bar is closed on every exit, so that an error or "interrupted" starts its own line
    instead of being glued to the bar's last update.
    """
    from indexes import embed

    total = len(run.plan.todo)
    with tqdm(total=total, unit="img", desc="indexing", mininterval=1.0, smoothing=0.1) as bar:
        todo = commit_failed(run)
        done = total - len(todo)
        bar.update(done)
        batches = embed.decode_batches([e.path for e, _ in todo], run.cfg, batch_size, workers)
        try:
            for start, decoded in zip(range(0, len(todo), batch_size), batches, strict=True):
                items = todo[start : start + len(decoded)]
                vecs = embed.embed_decoded(model, decoded, device)
                commit_batch(run.db, items, decoded, vecs, run.root_ids, run.report)
                done += len(items)
                bar.update(len(items))
                if progress:
                    progress(done, total)
        except KeyboardInterrupt:
            bar.close()
            log.warning(
                "interrupted: the %d of %d images embedded so far are kept (searchable now); "
                "the same command indexes the rest",
                done,
                total,
            )
            raise


def _reembed(
    roots: list[Path],
    collection: Path,
    encoder: Path | None,
    labels_csv: Path | None,
    options: FolderOptions,
    *,
    device: str,
    vector_dtype: str | None,
    batch_size: int,
    workers: int,
    progress: Progress | None,
) -> tuple[int, Any]:
    """Give every indexed image a vector by ``encoder`` and swap them in (``switch``).

    The scan comes first, as in any run: files gone are removed (never re-embedded), a folder
    that is not mounted is refused, renames and moves are applied. Returns the images
    re-embedded and the loaded model; (0, None) when there is nothing to switch: a new or empty
    collection (the run binds it), or one already embedded by ``encoder``.
    """
    if encoder is None:
        raise ValueError("--reembed needs the encoder to embed with: give --encoder DIR")
    cfg = read_encoder_config(encoder)
    switch.finish_switch(collection)
    if not preflight.vector_count(collection):
        return 0, None
    if manifest.same_encoder(manifest.read_manifest(collection), cfg):
        log.info("%s is embedded by %s already: nothing to re-embed", collection, encoder)
        if n := switch.discard(collection):
            log.info("discarded the %d vectors an unfinished --reembed had staged", n)
        return 0, None
    run = start_run(
        roots,
        collection,
        encoder,
        labels_csv,
        device=device,
        vector_dtype=vector_dtype,
        options=options,
        switching=True,
    )
    try:
        model = _load_model(run.encoder, device)
        entry = manifest.encoder_entry(run.encoder, run.cfg)
        staged = switch.stage(
            run.db,
            entry,
            run.cfg,
            model,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
        )
        if staged.failed:
            first, why = next(iter(staged.failed.items()))
            log.warning(
                "%d indexed images have no vector by the new encoder (first: %s: %s); they "
                "leave the collection now, and this run indexes them again as new files if "
                "they are still there",
                len(staged.failed),
                store.get_records(run.db, [first])[0].path,
                why,
            )
        switch.swap(collection, run.db, run.old or {}, entry, sorted(staged.failed))
    finally:
        run.db.conn.close()
    return staged.done, model
