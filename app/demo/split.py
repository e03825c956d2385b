"""Materialise the demo's fixed split as two ImageFolder trees of symlinks (no copies).

``python -m app.demo.split OUT`` writes ``OUT/train/<label>/*.webp`` and ``OUT/val/...`` from
``app/demo/images/manifest.csv``: the input of ``moco-search pretrain`` (train only, so the
held-out images stay unseen) and of ``moco-search eval --train OUT/train --val OUT/val``.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"


def write_split(out: Path, images: Path = IMAGES) -> dict[str, int]:
    counts: dict[str, int] = {}
    with open(images / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            dst = out / row["split"] / row["label"] / Path(row["path"]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.is_symlink():
                os.symlink(images / row["path"], dst)
            counts[row["split"]] = counts.get(row["split"], 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create train/ and val/ in")
    print(write_split(parser.parse_args().out))


if __name__ == "__main__":
    main()
