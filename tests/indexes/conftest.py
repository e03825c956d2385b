"""Fixtures for indexes/: a tiny real encoder, real image files and a built collection."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco import EncoderConfig, build_encoder, save_encoder

torch.set_num_threads(1)


def make_encoder(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = EncoderConfig(
        arch="resnet18", small_stem=True, feature_dim=512, image_size=32, crop_pct=1.0
    )
    save_encoder(build_encoder("resnet18", small_stem=True), cfg, out)
    return out


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("enc") / "enc", seed=0)


@pytest.fixture(scope="session")
def other_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("enc2") / "enc", seed=1)


def image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A distinct image: a few random colour blocks plus noise (not all alike to the encoder)."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    base = np.kron(blocks, np.ones((h // 4 + 1, w // 4 + 1, 1), dtype=np.uint8))[:h, :w]
    noise = rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))


def write_images(
    root: Path, per_label: dict[str, int], start_seed: int = 0, ext: str = ".png"
) -> list[Path]:
    """``root/<label>/<i>.png`` for each label; seeds make every image different."""
    paths, seed = [], start_seed
    for label, n in per_label.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = root / label / f"{i:03d}{ext}"
            image(seed).save(p)
            paths.append(p)
            seed += 1
    return paths


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_images(root, {"cat": 6, "dog": 6, "owl": 4})
    return root


def consistency(collection: Path) -> dict[str, int]:
    """Assert that database, vectors and the saved FAISS file agree; return status counts."""
    import faiss

    from indexes import vectors
    from indexes.manifest import read_manifest

    db = sqlite3.connect(collection / "meta.db")
    ok = sorted(r[0] for r in db.execute("SELECT id FROM images WHERE status = 'ok'"))
    vec = sorted(r[0] for r in db.execute("SELECT id FROM vectors"))
    assert ok == vec, "rows without vectors or orphan vectors"
    paths = db.execute("SELECT root_id, relpath_raw FROM images").fetchall()
    assert len(paths) == len(set(paths)), "a file indexed twice"
    gen = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
    assert int(gen[0]) == read_manifest(collection)["generation"]
    index = faiss.read_index(str(collection / "index.faiss"))
    assert vectors.index_ids(index).tolist() == ok, "FAISS ids differ from the database"
    counts = dict(db.execute("SELECT status, count(*) FROM images GROUP BY status"))
    db.close()
    return counts


def all_files(root: Path) -> set[bytes]:
    return {
        os.fsencode(os.path.relpath(os.path.join(d, f), root))
        for d, _, fs in os.walk(root)
        for f in fs
    }


def interrupted_reembed(images: Path, coll: Path, encoder: Path, staged: int = 4) -> None:
    """An ``index --reembed`` stopped by Ctrl-C once ``staged`` images have new vectors
    (batches of 4)."""
    from indexes import index_images

    def stop(done: int, total: int) -> None:
        if done >= staged:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_images([images], coll, encoder, workers=0, batch_size=4, reembed=True, progress=stop)
