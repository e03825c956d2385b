"""Reading user images safely: any folder, any format, and files that are broken or hostile.

One decoder, ``load_image``, is shared by pretraining and indexing so that both see the same
pixels: EXIF orientation applied, alpha composited on a fixed background, 16-bit and CMYK
converted, the first frame of an animation. Failures raise ``ImageError`` with a short reason.

It imports no torch (seconds): the web UI decodes images for thumbnails before anything needs the
network, and its page is served before torch is loaded.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError, features

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
"""Phones' photos (an iPhone's default): decoded with the optional ``pillow-heif``."""


def _decoded_types() -> frozenset[str]:
    """The file types this Pillow decodes that image folders hold: AVIF from Pillow 11.3 on,
    HEIC and HEIF when ``pillow-heif`` is installed (``pip install moco-search[heif]``), which
    this registers with Pillow for every decoder here (indexing, training, thumbnails)."""
    types = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ico"}
    try:
        if features.check_module("avif"):
            types.add(".avif")
    except ValueError:  # a Pillow older than its AVIF plugin
        pass
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return frozenset(types)
    register_heif_opener()
    return frozenset(types | HEIF_EXTENSIONS)


IMAGE_EXTENSIONS = _decoded_types()
"""What ``list_images`` picks up: the formats Pillow decodes that image folders hold."""


def heif_hint(extensions: Iterable[str]) -> str:
    """`` (for .heic: pip install pillow-heif)`` when ``extensions`` (lower case, of files this
    Pillow cannot read) hold a HEIF type, else ``""``: an iPhone's photos need one package."""
    heif = sorted(HEIF_EXTENSIONS.intersection(extensions))
    return f" (for {' and '.join(heif)}: pip install pillow-heif)" if heif else ""


def decoder_hint(path: str | os.PathLike) -> str:
    """``heif_hint`` for one file that could not be read: a ``.heic`` without ``pillow-heif``
    is "not an image" to Pillow, and that alone does not say what to do."""
    suffix = Path(path).suffix.lower()
    return heif_hint([suffix]) if suffix not in IMAGE_EXTENSIONS else ""


SYSTEM_FOLDERS = frozenset(
    {"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information", "__MACOSX"}
)
"""Folders that NAS boxes and operating systems keep among photos: Synology's ``@eaDir`` holds
resized copies of every photo, the others are recycle bins, snapshots and zip leftovers."""
MAX_PIXELS = 64_000_000
"""Larger images are refused as decompression bombs (Pillow's own limit is 89M, with a warning)."""
BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on this colour, for training and indexing alike."""


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short, stable description."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


ImageSource = str | os.PathLike | bytes | Image.Image


def open_image(source: ImageSource, draft_size: int | None = None) -> Image.Image:
    """``source`` opened, not decoded; a JPEG above Pillow's pixel limit too when ``draft_size``
    asks for a reduced decode (the caller, ``load_image``, then limits the decoded pixels).

    Pillow refuses an image of 89 MP or more at ``Image.open``, from its header alone. A 108 MP
    phone photo or a stitched panorama was therefore never indexed ("decompression bomb"), though
    DCT scaling decodes it at 1/8 of each side, 1.7 MP for 108 MP; and no JPEG decodes to more
    than 8192 x 8192 that way (its sides are at most 65,535). Other formats keep the limit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            if not draft_size or isinstance(source, Image.Image):
                raise
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            if not data.startswith(b"\xff\xd8\xff"):  # JPEG's start-of-image marker
                raise
            return JpegImagePlugin.JpegImageFile(io.BytesIO(data))


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty file")
        return Image.open(io.BytesIO(source))
    path = Path(source)
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file")
    except FileNotFoundError as e:
        raise ImageError("missing file", str(path)) from e
    except PermissionError as e:
        raise ImageError("permission denied", str(path)) from e
    try:
        return Image.open(path)
    except PermissionError as e:
        raise ImageError("permission denied", str(path)) from e
    except IsADirectoryError as e:
        raise ImageError("not a file", str(path)) from e


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 0..255 (``convert`` would clip them)."""
    a = np.asarray(im, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def load_image(
    source: ImageSource, draft_size: int | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode ``source`` (path, bytes or PIL image) to an RGB image.

    Args:
        source: a file path, the file's bytes, or an already opened PIL image.
        draft_size: JPEG only, let Pillow decode at a reduced scale no smaller than this
            (DCT scaling: 3-4x faster for large photos that are resized anyway).
        max_pixels: width*height to decode (after DCT scaling) above which the file is refused
            as a decompression bomb.

    Raises:
        ImageError: with ``reason`` one of: empty file, missing file, permission denied,
            not a file, not an image, decompression bomb, truncated, unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = open_image(source, draft_size)
            w, h = im.size
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))  # sets the size it will decode at
            if im.size[0] * im.size[1] > max_pixels:  # what decoding would allocate
                raise ImageError("decompression bomb", f"{w}x{h} pixels")
            im.seek(0)  # first frame of an animation
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's sentence quotes its own limits (89 or 179 MP), not the one that holds here
        size = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageError("decompression bomb", f"{int(size[1]):,} pixels" if size else "") from e
    except UnidentifiedImageError as e:  # Pillow's message names a BytesIO for bytes: say no more
        if not isinstance(source, (str, os.PathLike)):
            raise ImageError("not an image") from e
        raise ImageError("not an image", os.fspath(source) + decoder_hint(source)) from e
    except OSError as e:
        msg = str(e)
        low = msg.lower()  # JPEG headers cut short: "Truncated File Read"
        reason = "truncated" if "truncated" in low or "broken data" in low else "unreadable"
        raise ImageError(reason, msg) from e
    except Exception as e:  # Pillow plugins raise many types on hostile input
        raise ImageError("unreadable", f"{type(e).__name__}: {e}") from e
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        log.debug("ignoring unreadable EXIF orientation")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


RUN_FILES = frozenset({"config.json", "log.jsonl"})
"""A training run's folder holds these (``pretrain --out``, an ablate cell)."""
ENCODER_FILES = frozenset({"config.json", "model.safetensors"})
"""An exported encoder's folder holds these."""
OUTPUT_FILES = (RUN_FILES, frozenset({"ablation.json"}), ENCODER_FILES)  # and an ablate grid
"""Files that together mark a folder moco-search wrote. A run kept in the folder it trains on
(``pretrain photos --out photos/run``) put its ``curves.png`` into the next run's training images
and into the collection, and its checkpoints into the index's count of skipped files."""


def is_output_folder(filenames: list[str]) -> bool:
    """Whether a folder holding ``filenames`` is one moco-search wrote (``OUTPUT_FILES``)."""
    names = set(filenames)
    return any(marker <= names for marker in OUTPUT_FILES)


def is_hidden(name: str) -> bool:
    """Whether a file or folder named ``name`` is kept beside a library's images, never one of
    them: a dot-name (``.thumbnails``, ``.Trash-1000``, ``.DS_Store``, and macOS's ``._IMG_1.jpg``
    on a copied drive, a resource fork that no decoder reads) or one of ``SYSTEM_FOLDERS``.
    Indexed, they made a library's thumbnails near-duplicates of its photos and each ``._`` file
    an error row."""
    return name.startswith(".") or name in SYSTEM_FOLDERS


def walk_files(root: str | os.PathLike, hidden: list[Path] | None = None) -> list[Path]:
    """Every file under ``root``, recursive, in a stable sorted order; symlink loops are cut.

    Hidden files and folders below ``root`` (``is_hidden``) are passed over, and appended to
    ``hidden`` when it is given (a folder as itself, its files unvisited). Folders below ``root``
    that moco-search wrote (``is_output_folder``: a run, an encoder) are passed over in silence.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"Not a folder: {root} is a file; give the folder that holds it")
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if dirpath != str(root) and is_output_folder(filenames):
            dirnames[:] = []
            continue
        if hidden is not None:
            hidden += [Path(dirpath, n) for n in sorted(dirnames + filenames) if is_hidden(n)]
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found += [Path(dirpath, f) for f in filenames if not is_hidden(f)]
    return sorted(found)


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (by extension), recursive, sorted; symlink loops are cut, hidden
    files and folders passed over (``is_hidden``)."""
    return [p for p in walk_files(root) if p.suffix.lower() in IMAGE_EXTENSIONS]


def shared_files(paths: list[Path], others: list[Path]) -> int:
    """How many of ``paths`` are files of ``others`` too (the same file, however reached): a
    validation image that is a training image is its own nearest neighbour."""
    seen = {os.path.realpath(p) for p in others}
    return sum(os.path.realpath(p) in seen for p in paths)


class ImageFiles:
    """Images of a folder, ``(transform(img), index)`` per item; broken files give ``None``.

    A map-style dataset (``__len__`` and ``__getitem__`` are all ``DataLoader`` asks of one), not a
    ``torch.utils.data.Dataset`` subclass, so that this module imports no torch.

    A broken file is not fatal: ``__getitem__`` returns ``(None, index)``, ``collate_skip`` drops
    it from the batch, and the trainer logs the index in the run log.
    """

    def __init__(self, paths: list[Path], transform: Callable[[Image.Image], Any]) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        try:
            return self.transform(load_image(self.paths[i])), i
        except ImageError as e:
            log.warning("skipping %s: %s", self.paths[i], e)
            return None, i


def collate_skip(batch: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor, list[int]]:
    """Collate the good items; return them, their indexes, and the indexes of the broken ones.

    The good items' indexes let MoCo tell which queued keys come from the same image.
    """
    import torch
    from torch.utils.data import default_collate

    good = [x for x, _ in batch if x is not None]
    ids = torch.tensor([i for x, i in batch if x is not None], dtype=torch.long)
    bad = [i for x, i in batch if x is None]
    return (default_collate(good) if good else None), ids, bad
