"""The decoded image store: real files decoded once into a memory map, reused, kept safe."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco import imagestore
from moco.config import TrainConfig
from moco.data import load_image
from moco.imagestore import ImageStore, StoreError, open_store
from moco.trainset import StoreBatches, loader, make_dataset

SIDE = 32


@pytest.fixture
def folder(tmp_path: Path) -> list[Path]:
    """Six real PNGs of different shapes and colours, and one corrupt file."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 20), (10, 30), (64, 64), (33, 17), (8, 8), (100, 50)]):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(root / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    paths.append(root / "broken.png")
    paths[-1].write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return paths


def expected(path: Path) -> torch.Tensor:
    """What the store should hold for ``path``: load_image, fitted into SIDE, top-left."""
    im = load_image(path)
    if max(im.size) > SIDE:
        im.thumbnail((SIDE, SIDE))
    a = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    out = torch.zeros(3, SIDE, SIDE, dtype=torch.uint8)
    out[:, : a.shape[1], : a.shape[2]] = a
    return out


def check(store: ImageStore, paths: list[Path]) -> None:
    for i, p in enumerate(paths[:-1]):
        assert store.valid[i]
        assert torch.equal(store.gather(torch.tensor([i]))[0], expected(p)), p
        h, w = load_image(p).size[::-1]
        scale = min(1.0, SIDE / max(h, w))
        assert store.sizes[i].tolist() == [round(h * scale), round(w * scale)]
    assert not store.valid[-1]


def decoded(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoded")]


def test_decodes_each_image_once_and_reuses_the_store(
    folder: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moco")
    where = tmp_path / "store"
    check(open_store(folder, SIDE, where), folder)
    assert decoded(caplog) and "decoded 7 images" in decoded(caplog)[0]
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipping" in m and "broken.png" in m for m in messages)
    caplog.clear()
    again = open_store(folder, SIDE, where)  # a later run on the same folder
    check(again, folder)
    assert decoded(caplog) == []
    # Memory-mapped from the file, not copied into this process.
    maps = Path("/proc/self/maps").read_text()
    assert os.fspath(where / "pixels.u8") in maps


def test_a_changed_file_alone_is_decoded_again_into_a_new_slot(
    folder: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = tmp_path / "store"
    before = open_store(folder, SIDE, where)
    old_slot = int(before.slots[2])
    old_pixels = before.gather(torch.tensor([2]))[0].clone()
    Image.new("RGB", (20, 20), (0, 200, 0)).save(folder[2])
    os.utime(folder[2], ns=(1, 1))  # a new size and mtime
    caplog.set_level(logging.INFO, logger="moco")
    after = open_store(folder, SIDE, where)
    assert decoded(caplog) and "decoded 1 images" in decoded(caplog)[0]
    check(after, folder)
    assert int(after.slots[2]) != old_slot  # the slot the old index names is never written
    assert torch.equal(after.images[old_slot], old_pixels)
    # a third open reuses the freed slot for a new file
    new = folder[0].parent / "new.png"
    Image.new("RGB", (12, 12), (9, 9, 9)).save(new)
    grown = open_store([*folder[:-1], new, folder[-1]], SIDE, where)
    assert int(grown.slots[-2]) == old_slot


def test_an_interrupted_update_leaves_a_store_that_is_still_right(
    folder: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = tmp_path / "store"
    open_store(folder[:3], SIDE, where)
    real = imagestore.load_image

    def interrupted(path: str, **kw: object) -> Image.Image:
        if path.endswith("4.png"):
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(imagestore, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_store(folder, SIDE, where)
    monkeypatch.undo()
    index = json.loads((where / "index.json").read_text())
    assert len(index["files"]) == 3  # the old index, untouched
    check(open_store(folder, SIDE, where), folder)


@pytest.mark.parametrize("damage", ["byte", "truncate", "version", "garbage"])
def test_a_damaged_store_is_rebuilt_never_trusted(
    folder: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    where = tmp_path / "store"
    store = open_store(folder, SIDE, where)
    pixels, index = where / "pixels.u8", where / "index.json"
    if damage == "byte":
        data = bytearray(pixels.read_bytes())
        data[int(store.slots[1]) * 3 * SIDE * SIDE + 5] ^= 0xFF
        pixels.write_bytes(bytes(data))
    elif damage == "truncate":
        pixels.write_bytes(pixels.read_bytes()[:-100])
    elif damage == "version":
        meta = json.loads(index.read_text())
        index.write_text(json.dumps({**meta, "version": 0}))
    else:
        index.write_text("{not json")
    del store
    caplog.set_level(logging.INFO, logger="moco")
    check(open_store(folder, SIDE, where), folder)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert "decoded 7 images" in decoded(caplog)[0]


def test_parallel_decoding_writes_the_same_store(
    folder: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = folder[:-1]
    monkeypatch.setattr(imagestore, "CHUNK", 2)  # three chunks: the process pool decodes
    a = open_store(paths, SIDE, tmp_path / "a", workers=2)
    b = open_store(paths, SIDE, tmp_path / "b", workers=0)
    ids = torch.arange(len(paths))
    assert torch.equal(a.gather(ids), b.gather(ids)) and torch.equal(a.sizes, b.sizes)


def test_an_unwritable_store_falls_back_to_the_files(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from moco.data import list_images

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    paths = list_images(emoji_dir)[:4]
    common = dict(data=str(emoji_dir), out=str(tmp_path), image_size=16, batch_size=2)
    auto = TrainConfig(**common, store_dir=str(blocker))
    ds = make_dataset(auto, paths)
    assert not isinstance(ds, ImageStore)
    assert not isinstance(loader(ds, [0, 1], auto, world=1, epoch=0), StoreBatches)
    assert any("no decoded image store" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreError, match="--store-dir"):
        make_dataset(TrainConfig(**common, store_dir=str(blocker), augment="batch"), paths)


def test_the_store_side_keeps_small_crops_sharp_and_large_stores_small() -> None:
    assert imagestore.store_side(32) == 64 and imagestore.store_side(64) == 128
    side = imagestore.store_side(224)
    assert round(side * 3 / 4) >= 1.15 * 224 - 1 and 3 * side * side < 360_000
