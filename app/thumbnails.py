"""Result images as the browser gets them: files derived from indexed images, never originals.

The server shows only pictures it made itself from rows of the collection. Serving the image
folders directly would serve every file in them (a ``notes.txt`` or ``wallet.db`` beside the
photos, the collection's own database when it lies inside a root) and would hand the browser
whatever bytes a file holds, even when the indexer only accepted them as an image. So each shown
image is decoded with ``moco.load_image`` and re-encoded into a folder that holds nothing else:
images up to ``SIZE`` pixels as lossless PNG at their own size (pixels unchanged, so a search
from a shown result embeds what was indexed), larger ones as a ``SIZE``-pixel WebP (a photo
library would otherwise send megabytes per tile). Files are named by the content hash, so an
edited image gets a new one, and written aside then renamed, so a concurrent search never serves
half a file.

A thumbnail is made only from bytes that hash to what the indexer recorded. The path a row names
can point elsewhere by the time it is shown (a file replaced by a symlink to a picture outside
every indexed folder, or edited): decoding whatever is there would show pixels the collection
never indexed, and cache them under the indexed hash for every later copy of that image.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from moco import ImageError, atomic_file, load_image

SIZE = 320  # longest side; the gallery's tiles are at most about 250 px on a wide screen


def thumbs_dir(collection: Path) -> Path:
    """Where a collection keeps its thumbnails (the indexer skips it inside a root)."""
    return collection / "thumbs"


def user_thumbs_dir(collection: Path) -> Path:
    """Thumbnails of a collection that cannot be written: in the user's cache, one per path."""
    from app.demo import cache_dir

    key = hashlib.sha256(os.fsencode(os.path.realpath(collection))).hexdigest()[:16]
    return cache_dir() / "thumbs" / key


def writable_dir(path: Path) -> bool:
    """Whether files can be created in ``path`` (made if missing): tried, not guessed, since
    ``os.access`` answers yes to root on a read-only mount."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def choose_thumbs_dir(collection: Path) -> Path:
    """The collection's own ``thumbs/`` when it can be written, else the user cache's."""
    own = thumbs_dir(collection)
    return own if writable_dir(own) else user_thumbs_dir(collection)


def thumbnail(
    folder: Path,
    path: str,
    sha256: str | None,
    width: int | None,
    height: int | None,
    size: int = SIZE,
) -> str | None:
    """The file to show for the indexed image at ``path``, made in ``folder`` on first use.

    None when it cannot be made (the file is unreadable now, no longer holds the bytes that were
    indexed as ``sha256``, or ``folder`` is full): the caller shows nothing rather than fall back
    to serving the original.
    """
    small = bool(width and height and max(width, height) <= size)
    verified = bool(sha256)
    if not sha256:  # older rows: name it by where and what the file is instead
        try:
            st = os.stat(path)
        except OSError:
            return None
        sha256 = hashlib.sha256(os.fsencode(f"{path}\0{st.st_size}\0{st.st_mtime_ns}")).hexdigest()
    out = folder / sha256[:2] / (f"{sha256}.png" if small else f"{sha256}_{size}.webp")
    if out.is_file():
        return str(out)
    try:
        data = Path(path).read_bytes()
        if verified and hashlib.sha256(data).hexdigest() != sha256:
            return None  # not what was indexed: changed, or swapped for another file since
        im = load_image(data, draft_size=size)
        if max(im.size) > size:
            im.thumbnail((size, size))
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out, unique=True) as tmp:
            im.save(
                tmp,
                "PNG" if small else "WEBP",
                **({"compress_level": 1} if small else {"quality": 85}),
            )
    except (ImageError, OSError, ValueError):
        return None
    return str(out)
