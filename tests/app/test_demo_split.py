"""The demo's held-out split: fixed, disjoint, and every manifest row a real image."""

from __future__ import annotations

from pathlib import Path

from app.demo.split import write_split
from moco import list_images


def test_split_trees_are_disjoint_and_complete(tmp_path: Path) -> None:
    counts = write_split(tmp_path)
    train, val = list_images(tmp_path / "train"), list_images(tmp_path / "val")
    assert counts == {"train": len(train), "val": len(val)}
    assert 0.15 < len(val) / (len(train) + len(val)) < 0.25
    assert not {p.name for p in train} & {p.name for p in val}
    assert {p.parent.name for p in val} == {p.parent.name for p in train}  # every class held out
    assert all(p.resolve().is_file() for p in train + val)
    assert write_split(tmp_path) == counts  # idempotent
