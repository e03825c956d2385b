"""Fixtures for moco/: tiny real image folders (the demo's own emoji, and synthetic files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

DEMO = Path(__file__).resolve().parents[2] / "app" / "demo" / "images"


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 real images (4 classes x 8) copied from the demo set, which ships in the repository."""
    out = tmp_path_factory.mktemp("emoji")
    for label in ("animals_nature", "food_drink", "symbols", "travel_places"):
        (out / label).mkdir()
        for src in sorted((DEMO / label).glob("*.webp"))[:8]:
            shutil.copy(src, out / label / src.name)
    return out
