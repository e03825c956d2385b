"""Walking the image folders: which files exist now, their size, mtime and label.

The file list is ``moco.list_images``'s (the same files pretraining sees, symlink loops cut); the
other files are counted by extension, so that the summary can say what was passed over.
Each file is then ``stat``-ed here, following links, so that a broken link or a link loop becomes
a row with a reason instead of an exception. Paths are kept as bytes relative to their root.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from indexes.manifest import MANIFEST_NAME
from indexes.store import DB_NAME
from moco import IMAGE_EXTENSIONS, file_hash, is_within, walk_files


@dataclass(frozen=True)
class FileEntry:
    """A file found under a root now; ``error`` is set when it cannot even be ``stat``-ed."""

    root: str
    relpath_raw: bytes
    size: int | None
    mtime_ns: int | None
    label: str | None
    error: str | None = None

    @property
    def path(self) -> str:
        return os.fsdecode(os.path.join(os.fsencode(self.root), self.relpath_raw))


def stat_error(path: str) -> tuple[os.stat_result | None, str | None]:
    """``os.stat`` of ``path`` or the reason it failed, in the words the database records."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "broken symlink" if os.path.islink(path) else "missing file"
    except PermissionError:
        return None, "permission denied"
    except OSError as e:
        return None, "symlink loop" if e.errno == errno.ELOOP else f"unreadable: {e.strerror}"
    if not os.path.isfile(path):
        return None, "not a file"
    return st, None


def folder_label(relpath_raw: bytes) -> str | None:
    """The ImageFolder class: the first folder under the root, None for files at the top."""
    parts = relpath_raw.split(b"/")
    return parts[0].decode("utf-8", "backslashreplace") if len(parts) > 1 else None


@dataclass(frozen=True)
class Labels:
    """A ``--labels`` CSV: each absolute path's label, and each row's path as written with the
    absolute paths it may mean (a relative one, under each root)."""

    by_path: dict[str, str | None]
    rows: list[tuple[str, list[str]]]

    def unmatched(self, entries: list[FileEntry]) -> list[str]:
        """The rows' paths, as written, that name no file of ``entries`` (a typo, or a file
        moved since the CSV was made): their labels are applied to nothing."""
        found = {os.path.normpath(e.path) for e in entries}
        return [p for p, candidates in self.rows if found.isdisjoint(candidates)]


def read_labels(csv_path: str | os.PathLike, roots: list[str]) -> Labels:
    """``path,label`` rows (path absolute or relative to one of ``roots``)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Labels CSV not found: {csv_path}")
    labels = Labels({}, [])
    text = spreadsheet_text(csv_path)
    header = text.split("\n", 1)[0]
    delimiter = next((d for d in ",;\t" if d in header), ",")  # ";": Excel in many locales
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
        raise ValueError(
            f"{csv_path} needs a header with 'path' and 'label' columns, found {reader.fieldnames}"
        )
    given: dict[str, tuple[int, str | None]] = {}
    for row in reader:
        line = reader.line_num
        # Fields past the header's (a comma in an unquoted path), or no path or label: a
        # trailing column of the header's own may be left out
        if row.get(None) or row["path"] is None or row["label"] is None:
            n = sum(v is not None for k, v in row.items() if k is not None)
            n += len(row.get(None) or [])
            raise ValueError(
                f"{csv_path}, line {line}: {n} field{'s' * (n != 1)} where the header has "
                f"{len(reader.fieldnames)}: put a path or label holding the delimiter in double "
                'quotes ("a, b.jpg")'
            )
        p, label = row["path"], (row["label"] or "").strip() or None  # empty: no label
        if any(c in "\r\n" for c in p + (label or "")):
            raise ValueError(f"{csv_path}, line {line}: a quote is opened and never closed")
        if p in given and given[p][1] != label:
            raise ValueError(
                f"{csv_path}: {p} is labelled twice, {given[p][1]!r} (line {given[p][0]}) and "
                f"{label!r} (line {line})"
            )
        given[p] = (line, label)
        candidates = [p] if os.path.isabs(p) else [os.path.join(r, p) for r in roots]
        candidates = [os.path.normpath(c) for c in candidates]
        labels.rows.append((p, candidates))
        for c in candidates:
            labels.by_path[c] = label
    return labels


def spreadsheet_text(path: Path) -> str:
    """A CSV's text as spreadsheets save it: UTF-8 with or without a byte-order mark (Excel's
    "CSV UTF-8" starts with one, which made the header's first name "\ufeffpath"), or UTF-16
    (its "Unicode text")."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): save it "
            "as CSV UTF-8"
        ) from None


def in_a_collection(path: Path, root: str, memo: dict[Path, bool]) -> bool:
    """Whether ``path`` lies in a collection directory below ``root`` (its thumbnails, say).

    A collection kept inside the folder it indexes must not index its own files; each folder is
    checked once (``memo``).
    """
    for d in path.parents:
        if d not in memo:
            memo[d] = (d / MANIFEST_NAME).is_file() and (d / DB_NAME).is_file()
        if memo[d]:
            return True
        if str(d) == root:
            return False
    return False


@dataclass(frozen=True)
class Scan:
    """The image files under the roots now, and how many other files were passed over.

    ``skipped`` counts files by extension (lower case, ``(none)`` without one) that are not in
    ``IMAGE_EXTENSIONS``, so that a folder of ``.psd`` or ``.heic`` files is not dropped in
    silence; ``hidden`` names the hidden files and folders passed over (``moco.data.is_hidden``),
    relative to their root.
    """

    entries: list[FileEntry]
    skipped: dict[str, int]
    hidden: list[str] = field(default_factory=list)


OUTSIDE = "outside the allowed folders"
"""The reason recorded for a file that a symlink leads out of a confined folder."""


def scan(
    roots: list[str], labels: dict[str, str | None] | None = None, confine: tuple[str, ...] = ()
) -> Scan:
    """Every image file under ``roots`` (absolute paths), sorted by root then relative path.

    A root inside one of the ``confine`` folders (real paths) keeps its files to them: a file
    whose real path lies outside (reached through a symlink) is found with the error
    ``OUTSIDE``, so it is neither embedded nor shown. The web UI confines what it indexes to the
    folders ``--allow-index`` gave it; the command line follows links wherever they go.
    """
    entries: list[FileEntry] = []
    skipped: Counter[str] = Counter()
    memo: dict[Path, bool] = {}
    hidden: list[Path] = []
    for root in roots:
        root_raw = os.fsencode(root)
        limit = next((c for c in confine if is_within(os.path.realpath(root), c)), None)
        passed = len(hidden)
        for p in walk_files(root, hidden):
            if in_a_collection(p, root, memo):
                continue
            ext = p.suffix.lower()
            if ext not in IMAGE_EXTENSIONS:
                skipped[ext or "(none)"] += 1
                continue
            rel_raw = os.fsencode(os.path.relpath(p, root))
            path = os.fsdecode(os.path.join(root_raw, rel_raw))
            label = (labels or {}).get(path, folder_label(rel_raw))
            st, err = stat_error(path)
            if st and limit and not is_within(os.path.realpath(path), limit):
                st, err = None, OUTSIDE
            size = st.st_size if st else None
            mtime = st.st_mtime_ns if st else None
            entries.append(FileEntry(root, rel_raw, size, mtime, label, err))
        hidden[passed:] = [Path(os.path.relpath(h, root)) for h in hidden[passed:]]
    entries.sort(key=lambda e: (e.root, e.relpath_raw))
    return Scan(entries, dict(sorted(skipped.items())), [str(h) for h in hidden])


def sha256_file(path: str) -> str | None:
    """Content hash, or None if the file cannot be read (the decoder reports why later)."""
    try:
        return file_hash(path)
    except OSError:
        return None
