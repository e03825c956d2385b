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


def fresh_compile_stderr(code: str) -> str:
    """The stderr of ``code`` run in a fresh Python with an empty inductor cache.

    Torch prints some warnings once per process, and only on the way to a first compile: a
    warm cache would skip the code path a test is about.
    """
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
        )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr
