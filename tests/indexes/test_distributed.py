"""Two gloo processes on 127.0.0.1 (what torchrun starts) build the same collection as one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexes import Collection, index_images
from tests.conftest import free_port
from tests.indexes.conftest import consistency, write_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path: Path, encoder_dir: Path) -> None:
    images = tmp_path / "imgs"
    write_images(images, {"a": 9, "b": 8})
    shutil.copy(images / "a" / "000.png", images / "b" / "copy.png")
    (images / "b" / "empty.png").write_bytes(b"")
    (images / "broken.png").symlink_to(images / "nowhere.png")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "launch.py",
        "index",
        str(images),
        "--collection",
        str(tmp_path / "dist"),
        "--encoder",
        str(encoder_dir),
        "--workers",
        "0",
        "--batch-size",
        "3",
    ]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "17 images in the collection" in outs[0][0] and outs[1][0] == ""

    index_images([images], tmp_path / "one", encoder_dir, workers=0, batch_size=4)
    assert consistency(tmp_path / "dist") == consistency(tmp_path / "one")
    with Collection.open(tmp_path / "dist") as d, Collection.open(tmp_path / "one") as o:
        rows = "images.id > 0"
        key = [
            (r.relpath, r.id, r.status, r.reason, r.duplicate_of, r.sha256)
            for r in d.query_records(rows)
        ]
        assert key == [
            (r.relpath, r.id, r.status, r.reason, r.duplicate_of, r.sha256)
            for r in o.query_records(rows)
        ]
        ids = d.labeled()[0]
        np.testing.assert_allclose(d.vectors(ids), o.vectors(ids), atol=1e-4)
