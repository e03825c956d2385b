"""Result thumbnails: what the gallery shows instead of large original files.

The browser downloads each result to draw a tile of a couple of hundred pixels: for a photo
library that is megabytes per result and per search. A result larger than ``SIZE`` pixels is
therefore shown as a small WebP kept in the collection (``thumbs/``, named by the file's content
hash, so an edited file gets a new one); smaller files, such as the demo's emoji, are served as
they are.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from moco import ImageError, load_image

SIZE = 320  # longest side; the gallery's tiles are at most about 250 px on a wide screen


def thumbs_dir(collection: Path) -> Path:
    return collection / "thumbs"


def thumbnail(collection: Path, path: str, sha256: str | None, width: int | None,
              height: int | None, size: int = SIZE) -> str:
    """The file to show for the image at ``path``: a cached thumbnail, or ``path`` itself.

    ``path`` itself when the image is small enough already, has no recorded hash, or cannot be
    thumbnailed (unreadable now, or a read-only collection): showing the original is never wrong.
    """
    if not sha256 or (width and height and max(width, height) <= size):
        return path
    out = thumbs_dir(collection) / sha256[:2] / f"{sha256}_{size}.webp"
    if out.is_file():
        return str(out)
    try:
        im = load_image(path, draft_size=size)
        im.thumbnail((size, size))
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a concurrent search never serves half a file.
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            im.save(tmp, "WEBP", quality=85)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    except (ImageError, OSError):
        return path
    return str(out)
