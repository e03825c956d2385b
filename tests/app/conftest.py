"""Fixtures for app/: a real tiny collection (24 PNGs, 3 labels, tiny resnet18) and its server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import free_port, make_encoder

torch.set_num_threads(1)
LABELS = ("circle", "square", "stripes")
PER_LABEL = 8


def picture(label: str, i: int) -> Image.Image:
    """A 48x40 picture whose shape follows the label and whose colours follow ``i``."""
    shape = LABELS.index(label) if label in LABELS else 2
    rng = np.random.default_rng(1000 * shape + 7 * len(label) + i)
    bg, fg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    arr = np.zeros((40, 48, 3), np.uint8) + np.array(bg, np.uint8)
    yy, xx = np.mgrid[:40, :48]
    if shape == 0:
        mask = (yy - 20) ** 2 + (xx - 24) ** 2 < (8 + i) ** 2
    elif shape == 1:
        mask = (abs(yy - 20) < 6 + i) & (abs(xx - 24) < 6 + i)
    else:
        mask = (xx // (2 + i % 4)) % 2 == 0
    arr[mask] = fg
    arr = np.clip(arr.astype(int) + rng.integers(-15, 15, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def as_shown(markdown: str) -> str:
    """``markdown`` roughly as the page shows it: ``app.markup``'s escapes and code tags undone
    (the browser test renders the real thing)."""
    return re.sub(r"\\(.)", r"\1", re.sub(r"</?code>", "", markdown))


def write_tree(root: Path, labels: tuple[str, ...] = LABELS, n: int = PER_LABEL) -> Path:
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            picture(label, i).save(root / label / f"{label}_{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tree() -> Any:
    """``write_tree`` for tests that need image folders of their own."""
    return write_tree


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("enc") / "enc")


@pytest.fixture(scope="session")
def collection_dir(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path) -> Path:
    """A built collection over ``images/{circle,square,stripes}/*.png`` (24 images)."""
    from indexes import index_images

    base = tmp_path_factory.mktemp("coll")
    images = write_tree(base / "images")
    index_images([images], base / "collection", encoder_dir, batch_size=8, workers=0)
    return base / "collection"


@pytest.fixture(scope="session")
def ctx(collection_dir: Path) -> Iterator[Any]:
    from app.context import AppContext

    c = AppContext.open(collection_dir)
    c.example = str(sorted((collection_dir.parent / "images" / "circle").iterdir())[0])
    yield c
    c.collection.close()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def encoder_factory() -> Any:
    """``make_encoder`` for tests that need a second, different encoder."""
    return make_encoder


@pytest.fixture(scope="session")
def server(ctx: Any) -> Iterator[Any]:
    """The real UI on 127.0.0.1 (a free port), as ``moco-search app`` launches it."""
    from app.server import ServerConfig, launch

    demo = launch(ctx, ServerConfig(port=free_port(), max_file_size="1mb", concurrency=4))
    yield demo
    demo.close()


@pytest.fixture
def own_ctx(tmp_path: Path, encoder_dir: Path) -> Iterator[Any]:
    """``own_ctx(images, **kw)``: ``images`` indexed into a collection of the test's own
    (``tmp_path / "coll"``) and opened for the UI (``kw`` goes to ``AppContext.open``); every
    one opened is closed after the test."""
    from app.context import AppContext
    from indexes import index_images

    opened: list[AppContext] = []

    def make(images: Path, **kw: Any) -> AppContext:
        index_images([images], tmp_path / "coll", encoder_dir, workers=0)
        opened.append(AppContext.open(tmp_path / "coll", **kw))
        return opened[-1]

    yield make
    for ctx in opened:
        ctx.collection.close()
