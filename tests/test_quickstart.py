"""The README's quickstart: `python launch.py` on a fresh machine builds the demo and serves it.

Also the shipped demo encoder: it loads, matches its recorded hash, and beats a random-init
encoder of the same architecture and raw pixels on the demo's held-out kNN accuracy.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco import build_encoder, eval_transform, load_encoder, load_image
from moco.export import sha256_file
from moco.knn import knn_predict
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "app" / "demo"


@pytest.mark.slow
def test_python_launch_py_serves_the_demo(tmp_path: Path) -> None:
    env = {**os.environ, "MOCO_SEARCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "launch.py", "--ready-and-exit", "--port", str(free_port())]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ready at http://127.0.0.1:" in first.stdout
    assert "the example query returned 5 results" in first.stdout
    # The second run reuses the collection, and builds its page without torch (3 s: it loads
    # in the background once the server is up); fitting the encoder's map imported it.
    code = (
        "import sys, launch\n"
        "from app.server import ServerConfig, open_context\n"
        "from app.ui import build_demo\n"
        "ctx = open_context(ServerConfig())\n"
        "build_demo(ctx)\n"
        "print('torch before serving:', 'torch' in sys.modules)\n"
        "ctx.collection.close()\n"
        f"sys.exit(launch.main({cmd[2:]!r}))\n"
    )
    second = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building" not in second.stderr.lower()  # the second run reuses the collection
    assert "torch before serving: False" in second.stdout, second.stdout
    assert "the example query returned 5 results" in second.stdout


def split_features(model: torch.nn.Module, preprocess, rows: list[dict]) -> torch.Tensor:
    x = torch.stack([preprocess(load_image(DEMO / "images" / r["path"])) for r in rows])
    with torch.inference_mode():
        return torch.cat([model(b) for b in x.split(256)])


def test_shipped_encoder_loads_matches_its_hash_and_beats_random_init() -> None:
    model, cfg = load_encoder(DEMO / "encoder")
    assert cfg.content_hash == sha256_file(DEMO / "encoder" / "model.safetensors")
    assert (DEMO / "encoder" / "model.safetensors").stat().st_size < 25 * 2**20
    rows = list(csv.DictReader((DEMO / "images" / "manifest.csv").open()))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    classes = sorted({r["label"] for r in rows})
    y_train = torch.tensor([classes.index(r["label"]) for r in train])
    y_val = torch.tensor([classes.index(r["label"]) for r in val])
    preprocess = eval_transform(cfg)

    def knn_accuracy(net: torch.nn.Module) -> float:
        f_train, f_val = (
            split_features(net, preprocess, train),
            split_features(net, preprocess, val),
        )
        scores = knn_predict(f_train, y_train, f_val, len(classes), k=200, T=0.1)
        return (scores.argmax(1) == y_val).float().mean().item()

    torch.manual_seed(0)
    random_init = build_encoder(cfg.arch, small_stem=cfg.small_stem).eval()
    ours, baseline = knn_accuracy(model), knn_accuracy(random_init)
    pixels = knn_accuracy(torch.nn.Flatten())  # the same 64 px normalised pixels, as vectors
    assert ours > baseline + 0.05, (ours, baseline)
    assert ours > pixels + 0.03, (ours, pixels)
