"""``moco-search ablate``: a real 2x2 grid on tiny real images, its tables, plot and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import launch
from moco.ablate import Cell, cell_config, default_ks, grid
from moco.config import TrainConfig
from tests.conftest import interruptible

ROOT = Path(__file__).resolve().parents[2]


def grid_args(data: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "ablate",
        str(data),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--epochs",
        str(epochs),
        "--bn-splits",
        "2",
        "--k",
        "8,16",
        *extra,
    ]


def test_grid_cells_follow_the_paper() -> None:
    cells = grid(("end-to-end", "moco"), (16, 64, 256), (0.0, 0.99), 64, num_images=100)
    names = [c.name for c in cells]
    # end-to-end's dictionary is its batch: K=256 does not fit 100 images
    assert names == [
        "end-to-end_K16",
        "end-to-end_K64",
        "moco_K16",
        "moco_K64",
        "moco_K256",
        "moco_K64_m0",
        "moco_K64_m0.99",
    ]
    base = TrainConfig(data="d", out="o", batch_size=32)
    e2e = cell_config(base, Cell("end-to-end", 64), Path("x"))
    assert (e2e.batch_size, e2e.mechanism) == (64, "end-to-end")
    m = cell_config(base, Cell("moco", 64, 0.9), Path("x"))
    assert (m.moco_m, m.m_schedule, m.moco_k, m.batch_size) == (0.9, "constant", 64, 32)
    assert default_ks(1274) == (16, 32, 64, 128, 256)


def test_a_two_by_two_grid_writes_its_table_and_plot(emoji_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    extra = ("--mechanisms", "moco,memory-bank", "--momentum", "")
    rc = launch.main(grid_args(emoji_dir, out, *extra, epochs=1))
    assert rc == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [c["cell"] for c in report["cells"]] == [
        "moco_K8",
        "moco_K16",
        "memory-bank_K8",
        "memory-bank_K16",
    ]
    for c in report["cells"]:
        assert c["epochs"] == 1 and 0 <= c["view_recall"] <= 100 and c["loss"] > 0
    table = (out / "ablation.md").read_text()
    assert "| K | 8 | 16 |" in table
    labels = ("MoCo", "MoCo", "memory bank", "memory bank")
    for c, label in zip(report["cells"], labels, strict=True):
        assert f"| {label} |" in table and f"{c['view_recall']:.1f}" in table
    assert (out / "ablation.png").stat().st_size > 5000


def test_queue_only_options_are_refused_before_any_cell_runs(
    emoji_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "grid"
    rc = launch.main(grid_args(emoji_dir, out, "--exclude-nearest", "2", "--local-crops", "2"))
    assert rc != 0 and not (out / "cells").exists()
    err = capsys.readouterr().err
    assert "--local-crops and --exclude-nearest apply to MoCo's queue only" in err
    assert "Traceback" not in err
    # a momentum no run can use: refused before the K table trains (it was refused after)
    assert launch.main([*grid_args(emoji_dir, out), "--momentum", "0.9,1.5"]) == 2
    assert "--moco-m must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (out / "cells").exists()


def test_an_interrupted_grid_resumes_without_rerunning_finished_cells(
    emoji_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "grid"
    args = grid_args(emoji_dir, out, "--mechanisms", "moco", "--momentum", "")
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path, preexec_fn=interruptible
    )
    first, second = out / "cells" / "moco_K8", out / "cells" / "moco_K16"
    deadline = time.time() + 300
    # Ctrl-C inside the second cell: after its first epoch's checkpoint, before its result
    while not (second / "checkpoint_last.pt").is_file() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert (first / "result.json").is_file() and not (out / "ablation.md").exists()
    interrupted = not (second / "result.json").is_file()
    done_at = (first / "result.json").stat().st_mtime_ns

    rc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert (first / "result.json").stat().st_mtime_ns == done_at  # not trained again
    assert "MoCo K=8 (done earlier)" in rc.stderr
    if interrupted:  # the Ctrl-C landed inside the cell's training (almost always)
        assert "resuming the interrupted run" in rc.stderr
    rows = [json.loads(x) for x in (second / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # the second cell has both epochs, once each
    report = json.loads((out / "ablation.json").read_text())
    assert [c["cell"] for c in report["cells"]] == ["moco_K8", "moco_K16"]
