"""The demo collection: the shipped emoji images indexed with the shipped encoder, on first use.

``ensure_demo_collection`` builds it under the user's cache (``$MOCO_SEARCH_CACHE/demo``, else
``~/.cache/moco-search/demo``) the first time, trains its probe on the images of the fixed
``train`` split and measures it on the ``val`` split, and reuses it afterwards. The shipped
encoder is first exported again as ``moco-search export`` would for a user's own images
(``fitted_encoder``: layers 2-4, fitted to the demo images), which the repository does not
need to ship as a second 22 MB file. It is rebuilt when the encoder (by content hash) or the
image folder changes. The build goes to a temporary
sibling directory that is renamed into place at the end, so an interrupted first run never
leaves a half-built collection behind to be reused.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO_IMAGES = HERE / "images"
DEMO_ENCODER = HERE / "encoder"
SPLIT_CSV = DEMO_IMAGES / "manifest.csv"
EXAMPLE = "animals_nature"
"""The demo opens with the first held-out image of this label as its example query."""
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("MOCO_SEARCH_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "moco-search"


def read_split(csv_path: Path = SPLIT_CSV) -> list[dict[str, str]]:
    """Rows of the demo's ``manifest.csv``: path (relative to the images), label, split."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def demo_example(images: Path = DEMO_IMAGES) -> str | None:
    """A held-out demo image to show as the example query (None if the images are missing)."""
    csv_path = images / "manifest.csv"
    if not csv_path.is_file():
        return None
    rows = read_split(csv_path)
    val = [r for r in rows if r.get("split") == "val"] or rows
    pick = next((r for r in val if r["label"] == EXAMPLE), val[0] if val else None)
    return str(images / pick["path"]) if pick else None


def _is_current(coll: Path, content_hash: str, images: Path) -> bool:
    from indexes.manifest import MANIFEST_NAME, read_manifest
    from indexes.probes import list_probes

    if not (coll / MANIFEST_NAME).is_file():
        return False
    try:
        m = read_manifest(coll)
    except ValueError:
        return False
    return (
        m["encoder"]["content_hash"] == content_hash
        and m.get("roots") == [os.path.abspath(images)]
        and "default" in list_probes(coll)
    )


def train_demo_probe(coll: Path, images: Path) -> str:
    """Train probe ``default`` on the ``train`` split; its accuracy is on the ``val`` split."""
    from indexes import Collection
    from indexes.classify import train_probe

    split = {
        r["path"]: (r["label"], r.get("split", "train"))
        for r in read_split(images / "manifest.csv")
    }
    with Collection.open(coll) as col:
        parts: dict[str, tuple[list[int], list[str]]] = {"train": ([], []), "val": ([], [])}
        for rec in col.query_records("images.status = 'ok'"):
            label, which = split.get(rec.relpath, (rec.label, "train"))
            if label and which in parts:
                parts[which][0].append(rec.id)
                parts[which][1].append(label)
        result = train_probe(
            col,
            parts["train"][0],
            parts["train"][1],
            name="default",
            heldout=parts["val"] if parts["val"][0] else None,
        )
    return result.line()


def fitted_encoder(encoder: Path, images: Path, base: Path) -> Path:
    """``encoder`` exported again with export's defaults (pooling, map fitted to ``images``),
    kept in ``base`` under the shipped encoder's hash; ``encoder`` itself if it has a map.

    On the demo's split (fitted on the train split only) this raises the shipped encoder's kNN
    from 62.2 to 67.5 and recall@1 from 63.4 to 64.7, the probe 66.6 -> 66.9; the previous
    encoder's kNN rose from 55.3 to 60.3 (docs/demo-encoder.md)."""
    from moco import read_encoder_config

    cfg = read_encoder_config(encoder)
    if cfg.fit:
        return encoder
    out = base / f"encoder-{cfg.content_hash[:16]}"
    if not (out / "config.json").is_file():  # written last: present means complete
        from moco import export_encoder  # torch: to fit, on the first run only

        for old in base.glob("encoder-*"):  # the fit of an encoder no longer shipped
            shutil.rmtree(old, ignore_errors=True)
        log.info("fitting the demo encoder to the demo images (first run only)")
        export_encoder(encoder, out, half=True, pooling="auto", fit="auto", fit_on=images)
    return out


def ensure_demo_collection(
    cache: Path | None = None,
    *,
    encoder: Path = DEMO_ENCODER,
    images: Path = DEMO_IMAGES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The demo collection's directory, built (index + probe) if missing or outdated.

    Args:
        cache: where to keep it (default ``cache_dir() / "demo"``).
        encoder: the encoder directory (``model.safetensors`` + ``config.json``).
        images: the demo image tree with its ``manifest.csv`` split.
        progress: called with (done, total) while images are embedded.
    """
    from moco import exclusive, output_folder

    if not (Path(encoder) / "config.json").is_file():
        raise FileNotFoundError(
            f"Demo encoder not found at {encoder}: it ships with the "
            "repository (app/demo/encoder/); pass --collection to use yours"
        )
    if not images.is_dir():
        raise FileNotFoundError(f"Demo images not found at {images}")
    base = Path(cache) if cache is not None else cache_dir() / "demo"
    try:
        output_folder(base, "The demo's cache folder")
    except (NotADirectoryError, PermissionError) as e:  # a full disk says so where it is caught
        raise type(e)(
            f"{e}: set MOCO_SEARCH_CACHE to a folder you can write, or open your own collection "
            "with --collection"
        ) from e
    # A second `python launch.py` started during the first one's build (a minute) waits, then
    # reuses it: building beside it removed the other's files mid-build, and one of the two
    # ended in a FAISS traceback.
    with exclusive(
        base / "build.lock",
        lambda pid: f"another moco-search{pid} is building the demo collection: waiting for it",
        waiting=log.info,
    ):
        return _ensure(base, Path(encoder), images, progress)


def _ensure(
    base: Path, encoder: Path, images: Path, progress: Callable[[int, int], None] | None
) -> Path:
    """``ensure_demo_collection``'s work, under its lock."""
    from indexes import index_images
    from moco import read_encoder_config

    encoder = fitted_encoder(encoder, images, base)
    cfg = read_encoder_config(encoder)
    coll = base / "collection"
    if _is_current(coll, cfg.content_hash, images):
        return coll
    log.info("building the demo collection in %s (first run only)", coll)
    tmp = base / "collection.building"
    shutil.rmtree(tmp, ignore_errors=True)
    report = index_images([images], tmp, Path(encoder), progress=progress)
    log.info("demo: %s", report.summary())
    log.info("demo: %s", train_demo_probe(tmp, images))
    shutil.rmtree(coll, ignore_errors=True)
    os.replace(tmp, coll)
    return coll
