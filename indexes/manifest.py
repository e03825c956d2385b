"""``manifest.json``: what a collection directory holds, readable without opening anything else.

It names the encoder (path, content hash, config and so its preprocessing), the feature dim and
metric, the FAISS index type with its search parameters and measured recall, the counts, and the
database ``generation`` the FAISS file was saved at. A reader whose database has moved on since
(an index run killed before it saved the FAISS file) reconciles the index from stored vectors.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from indexes.faults import atomic_file
from indexes.store import DB_NAME
from moco import EncoderConfig, encoder_dir

MANIFEST_NAME = "manifest.json"
FORMAT = 1


def not_a_collection(path: Path) -> str:
    """What ``path`` (a folder without a manifest) is instead of a collection, and what to do:
    a run, an encoder or an image folder given for the collection, as newcomers do."""
    from moco import ENCODER_FILES, IMAGE_EXTENSIONS, RUN_FILES  # an error path: torch is fine

    names = set(os.listdir(path)) if path.is_dir() else set()
    if names >= RUN_FILES:
        enc = path / "encoder"
        return (
            f"{path} is a pretraining run, not a collection: export its encoder (moco-search "
            f"export {path / 'checkpoint_last.pt'} --out {enc}), then index your images with it "
            f"(moco-search index IMAGES --collection C --encoder {enc})"
        )
    if names >= ENCODER_FILES:
        return (
            f"{path} is an encoder, not a collection: index your images with it (moco-search "
            f"index IMAGES --collection C --encoder {path})"
        )
    if path.is_dir():
        first = itertools.islice(path.rglob("*"), 10_000)  # a look, not a full walk
        if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in first):
            return (
                f"{path} is an image folder, not a collection: index it first (moco-search "
                f"index {path} --collection {path.name}.coll)"
            )
    return f"Not a collection (no {MANIFEST_NAME}): {path}"


def read_manifest(collection: str | os.PathLike) -> dict[str, Any]:
    path = Path(collection) / MANIFEST_NAME
    if not Path(collection).exists():
        raise FileNotFoundError(f"Collection not found: {collection}")
    if not path.is_file():
        if (Path(collection) / DB_NAME).is_file():  # a collection that lost its manifest
            raise FileNotFoundError(
                f"Collection {collection} has its database but no {MANIFEST_NAME} (deleted, or "
                "not copied with the database?): restore it from a backup, or index its folders "
                f"again with the encoder that made it (moco-search index --collection "
                f"{collection} --encoder ENC): ids and labels are kept"
            )
        raise FileNotFoundError(not_a_collection(Path(collection)))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # the run writes it whole
        raise ValueError(
            f"{path} is damaged ({e}): restore it from a copy, or index the folders again into "
            "a new collection"
        ) from None
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"Collection {collection} has manifest format {manifest.get('format')}, "
            f"this version reads format {FORMAT}"
        )
    return manifest


def write_manifest(collection: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Atomic replace (temp + rename), stamping ``updated``."""
    path = Path(collection) / MANIFEST_NAME
    manifest = {**manifest, "format": FORMAT, "updated": time.time()}
    manifest.setdefault("created", manifest["updated"])
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def encoder_entry(path: str | os.PathLike, cfg: EncoderConfig) -> dict[str, Any]:
    config = dataclasses.asdict(cfg)
    config.pop("training", None)  # may hold a whole training log; the encoder dir keeps it
    return {
        "path": str(encoder_dir(path).resolve()),
        "content_hash": cfg.content_hash,
        "config": config,
    }


# Besides the weights (``content_hash``), what decides an image's vector: an encoder exported
# again at another size keeps its hash but its vectors no longer compare with the old ones.
FEATURE_FIELDS = (
    "arch",
    "small_stem",
    "feature_dim",
    "image_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
    "pooling",
)


def encoder_changes(manifest: dict[str, Any], cfg: EncoderConfig) -> list[str]:
    """How ``cfg`` embeds differently from the collection's encoder, as "field old -> new"."""
    saved = manifest["encoder"].get("config", {})
    now = dataclasses.asdict(cfg)

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, list | tuple) else v

    return [
        f"{k} {plain(saved[k])} -> {plain(now[k])}"
        for k in FEATURE_FIELDS
        if k in saved and plain(saved[k]) != plain(now[k])
    ]


def same_encoder(manifest: dict[str, Any], cfg: EncoderConfig) -> bool:
    """Whether ``cfg`` makes the same vectors as the encoder the collection was built with."""
    same_weights = manifest["encoder"]["content_hash"] == cfg.content_hash
    return same_weights and not encoder_changes(manifest, cfg)


def check_encoder(
    manifest: dict[str, Any],
    cfg: EncoderConfig,
    path: str | os.PathLike,
    collection: str | os.PathLike = "C",
) -> None:
    """Refuse an encoder other than the one the collection's vectors came from."""
    want = manifest["encoder"]["content_hash"]
    if cfg.content_hash != want:
        raise ValueError(
            f"Encoder mismatch: the collection was built with encoder {want[:16]} "
            f"({manifest['encoder']['path']}), but {path} is encoder {cfg.content_hash[:16]}; "
            "vectors of different encoders cannot be compared. Use the original encoder, "
            f"re-embed the collection with this one (index --collection {collection} "
            f"--encoder {path} --reembed: ids and labels are kept), or index into a new "
            "collection."
        )
    if changes := encoder_changes(manifest, cfg):
        raise ValueError(
            f"Encoder mismatch: {path} has the weights the collection was built with "
            f"({want[:16]}) but embeds differently ({', '.join(changes)}); its vectors cannot "
            "be compared with the collection's. Export it again as it was, re-embed the "
            f"collection with it (index --collection {collection} --encoder {path} --reembed), "
            "or index into a new collection."
        )
