"""Broken and unusual files: broken ones recorded with a reason, unusual ones indexed right."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexes import Collection, index_images
from tests.indexes.conftest import consistency, image, write_images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + _chunk(b"IEND", b"")
    )


def write_hostile(root: Path) -> dict[bytes, str | None]:
    """The hostile zoo; value = expected error reason, None = must be indexed fine."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[bytes, str | None] = {}

    def put(name: str | bytes, data: bytes, reason: str | None) -> None:
        path = os.path.join(os.fsencode(root), os.fsencode(name))
        with open(path, "wb") as f:
            f.write(data)
        expect[os.fsencode(name)] = reason

    def save(im: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    put("zero.jpg", b"", "empty file")
    jpg = save(image(1), "JPEG")
    put("truncated.jpg", jpg[: len(jpg) // 2], "truncated")
    put("text.png", b"this is not an image at all", "not an image")
    put("bomb.png", png_bomb(20_000, 20_000), "decompression bomb")
    put("bomb2.png", png_bomb(9_000, 9_000), "decompression bomb")  # under Pillow's own limit
    put("cmyk.jpg", save(image(2).convert("CMYK"), "JPEG"), None)
    put(
        "sixteen.png",
        save(Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)), "PNG"),
        None,
    )
    pal = image(3).convert("P", palette=Image.Palette.ADAPTIVE)
    put("palette.png", save(pal, "PNG", transparency=0), None)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", save(image(4), "JPEG", exif=exif), None)
    frames = [image(5), image(6)]
    put("anim.gif", save(frames[0], "GIF", save_all=True, append_images=frames[1:]), None)
    put(b"caf\xe9-latin1.png", save(image(7), "PNG"), None)  # not UTF-8
    os.symlink(root / "missing-target.png", root / "broken.png")
    expect[b"broken.png"] = "broken symlink"
    os.symlink(root / "loop-b.png", root / "loop-a.png")
    os.symlink(root / "loop-a.png", root / "loop-b.png")
    expect[b"loop-a.png"] = expect[b"loop-b.png"] = "symlink loop"
    os.symlink(root, root / "dir-loop")  # a folder symlink loop must not hang the walk
    return expect


def test_hostile_files_recorded_good_ones_kept(tmp_path: Path, encoder_dir: Path) -> None:
    root = tmp_path / "imgs"
    good = write_images(root, {"good": 5})
    expect = write_hostile(root / "zoo")
    report = index_images([root], tmp_path / "c", encoder_dir, workers=0, batch_size=4)
    bad = {k: v for k, v in expect.items() if v}
    assert sum(report.errors.values()) == len(bad)
    with Collection.open(tmp_path / "c") as c:
        errors = {os.fsencode(Path(r.path).name): r.reason for r in c.errors()}
        assert errors == bad
        ok = c.query_records("images.status = 'ok'")
        names = {os.fsencode(Path(r.path).name) for r in ok}
        assert names >= {os.fsencode(p.name) for p in good}  # no good image lost
        assert names >= {k for k, v in expect.items() if v is None}
        assert len(ok) == 5 + len(expect) - len(bad)
        for r in ok:  # each decodable file is findable, odd ones included
            assert c.search(r.path, k=1)[0].id == r.id
        rotated = next(r for r in ok if r.path.endswith("rotated.jpg"))
        assert (rotated.width, rotated.height) == (40, 48)  # shown upright: sideways size
        odd = next(r for r in ok if r.relpath.startswith("zoo/caf"))
        assert odd.relpath == "zoo/caf\\xe9-latin1.png" and Path(odd.path).is_file()
        assert c.resolve_path(odd.id) == Path(odd.path)
    assert consistency(tmp_path / "c")["error"] == len(bad)
    again = index_images([root], tmp_path / "c", None, workers=0)
    assert (again.added, again.updated, again.errors) == (0, 0, {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_recorded(tmp_path: Path, encoder_dir: Path) -> None:
    root = tmp_path / "imgs"
    write_images(root, {"a": 2})
    secret = root / "a" / "secret.png"
    image(9).save(secret)
    secret.chmod(0)
    index_images([root], tmp_path / "c", encoder_dir, workers=0)
    with Collection.open(tmp_path / "c") as c:
        assert [(Path(r.path).name, r.reason) for r in c.errors()] == [
            ("secret.png", "permission denied")
        ]


def test_a_photo_above_pillows_pixel_limit_is_indexed(
    images: Path, encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 108 MP JPEG was recorded as a "decompression bomb" (Pillow's limit lowered here so
    that an 800x400 file stands for one); it is decoded at 1/8 scale and indexed at its size."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    image(5, size=(800, 400)).save(images / "cat" / "pano.jpg", quality=90)
    index_images([images], tmp_path / "c", encoder_dir, workers=0)
    with Collection.open(tmp_path / "c") as c:
        (row,) = c.query_records("images.relpath = 'cat/pano.jpg'")
        assert row.status == "ok" and (row.width, row.height) == (800, 400)
