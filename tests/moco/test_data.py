"""moco.data: decoding real files (broken, hostile, unusual), listing, skipping in batches."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moco.data import BACKGROUND, ImageError, ImageFiles, collate_skip, list_images, load_image


def _png(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _noise(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _reason(source: object, **kw: object) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, **kw)  # type: ignore[arg-type]
    return info.value.reason


def _pixel(im: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(np.asarray(im)[xy[1], xy[0]].tolist())


# --- errors: each case has one stable reason ---------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    assert _reason(_write(tmp_path / "empty.png", b"")) == "empty file"
    assert _reason(b"") == "empty file"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpg") == "missing file"
    (tmp_path / "dir.png").mkdir()
    assert _reason(tmp_path / "dir.png") == "not a file"


def test_not_an_image(tmp_path: Path) -> None:
    assert _reason(_write(tmp_path / "notes.jpg", b"hello, I am text\n" * 20)) == "not an image"


def test_truncated_png(tmp_path: Path) -> None:
    data = _png(_noise())
    assert _reason(_write(tmp_path / "half.png", data[: len(data) // 2])) == "truncated"
    assert _reason(_write(tmp_path / "head.png", data[:60])) == "truncated"  # IHDR only


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg(_noise())
    assert _reason(_write(tmp_path / "half.jpg", data[: len(data) // 2])) == "truncated"
    # Cut inside the headers: Pillow says "Truncated File Read" (capital T).
    assert _reason(_write(tmp_path / "head.jpg", data[:300])) == "truncated"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims ``width`` x ``height`` with a correct CRC."""
    data = bytearray(_png(Image.new("RGB", (4, 4))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "bomb.png", _png_claiming(100_000, 100_000))
    assert path.stat().st_size < 200
    assert _reason(path) == "decompression bomb"
    for side in (12_000, 100_000):  # Pillow's warning (over 89 MP) and error (over 179 MP)
        with pytest.raises(ImageError) as refused:  # say the size, not Pillow's own limits
            load_image(_write(tmp_path / "b.png", _png_claiming(side, side)))
        assert refused.value.detail == f"{side * side:,} pixels"


def test_decompression_bomb_below_pillow_limit(tmp_path: Path) -> None:
    """Our own limit, under Pillow's: refused before any pixel is decoded."""
    path = _write(tmp_path / "big.png", _png_claiming(10_000, 8_000))  # 80M pixels
    assert _reason(path) == "decompression bomb"
    small = _write(tmp_path / "small.png", _png(Image.new("RGB", (100, 100))))
    assert _reason(small, max_pixels=99 * 100) == "decompression bomb"
    assert load_image(small, max_pixels=100 * 100).size == (100, 100)


def test_a_jpeg_above_pillows_limit_is_decoded_at_a_reduced_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 108 MP phone photo or a panorama was refused as a bomb at ``Image.open`` (Pillow's 89 MP
    limit, from the header), though indexing decodes it at 1/8 scale. Pillow's limit is lowered
    here so that an 800x400 file stands for one; the limit now holds on decoded pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # refused at open above 100,000
    jpeg = tmp_path / "pano.jpg"
    Image.new("RGB", (800, 400), (200, 30, 30)).save(jpeg, quality=90)
    png = tmp_path / "pano.png"
    Image.new("RGB", (800, 400), (200, 30, 30)).save(png)
    for source in (jpeg, jpeg.read_bytes()):
        im = load_image(source, draft_size=100, max_pixels=100_000)  # DCT-scaled by 4
        assert im.size == (200, 100) and im.getpixel((50, 50))[0] > 180
    assert _reason(jpeg) == "decompression bomb"  # no reduced decode asked for
    assert _reason(jpeg, draft_size=400, max_pixels=100_000) == "decompression bomb"  # 800x400
    assert _reason(png, draft_size=100, max_pixels=100_000) == "decompression bomb"  # not a JPEG


# --- formats and colour handling ---------------------------------------------------------------


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _write(tmp_path / "cmyk.jpg", _jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0))))
    assert Image.open(path).mode == "CMYK"
    im = load_image(path)
    assert im.mode == "RGB"
    r, g, b = _pixel(im, (8, 8))
    assert r > 240 and g < 15 and b < 15  # cyan-free, magenta+yellow: red


def test_16bit_png_keeps_contrast(tmp_path: Path) -> None:
    """Values above 255 must not be clipped to white by a plain ``convert``."""
    a = np.zeros((8, 16), dtype=np.uint16)
    a[:, :8] = 10_000
    a[:, 8:] = 50_000
    path = _write(tmp_path / "deep.png", _png(Image.fromarray(a)))
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (8, 16, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 15].tolist() == [255, 255, 255]


def test_palette_transparency_composited_on_background(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)  # transparent red
    p.putpixel((1, 0), 1)  # opaque blue
    path = _write(tmp_path / "pal.png", _png(p, transparency=0))
    im = load_image(path)
    assert _pixel(im, (0, 0)) == BACKGROUND == (255, 255, 255)
    assert _pixel(im, (1, 0)) == (0, 0, 255)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent: background
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half black over white: mid grey
    im = load_image(_write(tmp_path / "a.png", _png(rgba)))
    assert im.mode == "RGB"
    assert _pixel(im, (0, 0)) == (255, 255, 255)
    assert _pixel(im, (1, 0)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in _pixel(im, (2, 0)))


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 200, 0))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = _write(tmp_path / "rot.jpg", _jpeg(im, exif=exif.tobytes()))
    assert Image.open(path).size == (40, 20)
    out = load_image(path)
    assert out.size == (20, 40)
    r, g, _ = _pixel(out, (10, 2))  # the left band ends on top after a clockwise turn
    assert r > 200 and g < 60


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    assert _pixel(load_image(path), (4, 4)) == (255, 0, 0)
    opened = Image.open(path)
    opened.seek(1)  # even when handed an image positioned at a later frame
    assert _pixel(load_image(opened), (4, 4)) == (255, 0, 0)


def test_bytes_and_pil_input() -> None:
    src = Image.new("RGB", (5, 7), (10, 20, 30))
    from_bytes = load_image(_png(src))
    from_pil = load_image(src)
    for im in (from_bytes, from_pil):
        assert im.mode == "RGB" and im.size == (5, 7)
        assert _pixel(im, (2, 3)) == (10, 20, 30)
    assert load_image(src.convert("L")).mode == "RGB"


def test_jpeg_draft_decodes_smaller(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.jpg", _jpeg(_noise(256)))
    assert load_image(path).size == (256, 256)
    w, h = load_image(path, draft_size=64).size
    assert 64 <= min(w, h) < 256


# --- listing -----------------------------------------------------------------------------------


def test_list_images_recursive_sorted_filtered(tmp_path: Path) -> None:
    for rel in ["b/z.PNG", "b/a.jpeg", "a.JPG", "c/d/e.WebP", "c/x.gif", "notes.txt", "c/y.tif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a.JPG", "b/a.jpeg", "b/z.PNG", "c/d/e.WebP", "c/x.gif", "c/y.tif"]
    assert list_images(tmp_path) == list_images(str(tmp_path))  # stable


def test_list_images_symlink_loop_terminates(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")  # a/loop -> a
    os.symlink(tmp_path, tmp_path / "a" / "up")  # a/up -> root
    got = list_images(tmp_path)
    assert 1 <= len(got) <= 3
    assert {p.name for p in got} == {"one.png"}


def test_list_images_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")


# --- datasets: broken files dropped, their indexes reported ------------------------------------


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im.resize((8, 8)))).permute(2, 0, 1)


def test_image_files_and_collate_skip(tmp_path: Path) -> None:
    good = _png(Image.new("RGB", (10, 10), (1, 2, 3)))
    files = {
        "0.png": good,
        "1.png": b"",
        "2.png": good,
        "3.png": _png(_noise())[:70],
        "4.png": b"not an image at all",
        "5.png": good,
    }
    for name, data in files.items():
        _write(tmp_path / name, data)
    ds = ImageFiles(list_images(tmp_path), _to_tensor)
    assert len(ds) == 6
    assert ds[1] == (None, 1)
    x, i = ds[2]
    assert i == 2 and x.shape == (3, 8, 8)
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_skip, num_workers=0))
    (x0, ids0, bad0), (x1, ids1, bad1) = batches
    assert bad0 == [1] and bad1 == [3, 4]
    assert ids0.tolist() == [0, 2] and ids1.tolist() == [5]
    assert x0.shape == (2, 3, 8, 8) and x1.shape == (1, 3, 8, 8)
    assert x0[:, 0].unique().tolist() == [1]


def test_collate_skip_all_broken() -> None:
    x, ids, bad = collate_skip([(None, 4), (None, 7)])
    assert x is None and ids.numel() == 0 and bad == [4, 7]
