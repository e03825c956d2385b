"""Helpers shared by the test packages: a free local port and a tiny real encoder directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _store_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Decoded image stores (moco.imagestore) go to a temporary folder, not ~/.cache."""
    os.environ["MOCO_SEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def interruptible() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT (Ctrl-C): Python turns SIGINT
    into KeyboardInterrupt only if it is not ignored at start, and a shell ignores it for the
    jobs it starts in the background (``pytest &``), which the child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_encoder(out: Path, seed: int = 0) -> Path:
    """A random-init ResNet-18 (small stem, 32 px) saved as an encoder directory at ``out``."""
    import torch

    from moco import EncoderConfig, build_encoder, save_encoder

    torch.manual_seed(seed)
    cfg = EncoderConfig(
        arch="resnet18", small_stem=True, feature_dim=512, image_size=32, crop_pct=1.0
    )
    save_encoder(build_encoder("resnet18", small_stem=True), cfg, out)
    return out


# Another process takes a lock as ``moco.exclusive`` does, writes its pid, says so, and holds it.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)  # as moco.files.exclusive does: a longer pid left there reads as another
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
sys.stdin.read()
"""


def hold(lock: Path) -> subprocess.Popen:
    """A process holding ``lock`` until killed (kill it as ``kill -9`` would: ``.kill()``)."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p
