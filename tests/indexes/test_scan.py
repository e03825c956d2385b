"""What the scan picks up: the image formats folders hold, and a count of the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import launch
from indexes import Collection
from tests.indexes.conftest import image, write_images

ROOT = Path(__file__).resolve().parents[2]


def test_ico_is_indexed_and_other_types_are_counted(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image(90).save(images / "cat" / "favicon.ico")
    for name in ("a.psd", "b.psd", "c.PSD"):
        (images / "dog" / name).write_bytes(b"8BPS\x00\x01")
    coll = images / "coll"  # inside its root: its own files are neither indexed nor counted
    args = ["index", str(images), "--collection", str(coll), "--workers", "0"]
    assert launch.main([*args, "--encoder", str(encoder_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("17 images in the collection, 0 exact copies besides (17 new")
    assert out.splitlines()[0].endswith("; 3 files skipped: unsupported type .psd")
    assert out.splitlines()[1].startswith(f"next: moco-search search --collection {coll} ")
    with Collection.open(coll) as c:
        (ico,) = c.query_records("images.relpath = 'cat/favicon.ico'")
        assert ico.status == "ok" and ico.format == "ICO"
        assert c.search(images / "cat" / "favicon.ico", k=1)[0].id == ico.id
    (images / "notes.txt").write_text("not an image\n")
    assert launch.main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("; 4 files skipped: unsupported types .psd (3), .txt (1)")
    last_run = json.loads((coll / "manifest.json").read_text())["last_run"]
    assert last_run["skipped"] == {".psd": 3, ".txt": 1}


def test_avif_and_heic_photos_are_indexed_and_found_by_themselves(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An iPhone's photos are HEIC, and AVIF is what phones and the web move to: both were
    passed over as "unsupported type", most of a phone's library gone from the collection."""
    heif = pytest.importorskip("pillow_heif")  # in the test extra; a user's may lack it
    heif.from_pillow(image(91, (64, 48))).save(images / "cat" / "phone.heic", quality=95)
    image(92, (64, 48)).save(images / "dog" / "web.avif", quality=95)
    coll = tmp_path / "coll"
    args = ["index", str(images), "--collection", str(coll), "--workers", "0"]
    assert launch.main([*args, "--encoder", str(encoder_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("18 images in the collection") and "skipped" not in out
    with Collection.open(coll) as c:
        for name, fmt in (("cat/phone.heic", "HEIF"), ("dog/web.avif", "AVIF")):
            (rec,) = c.query_records("images.relpath = ?", [name])
            assert rec.status == "ok" and rec.format == fmt
            hit = c.search(images / name, k=1)[0]
            assert hit.id == rec.id and hit.score > 0.999


WITHOUT_HEIF = """
import sys
sys.modules["pillow_heif"] = None  # a user's Python without pillow-heif
import launch
from app import handlers
from app.context import AppContext
images, coll, encoder = sys.argv[1:]
phone = images + "/cat/phone.heic"
launch.main(["index", images, "--collection", coll, "--encoder", encoder, "--workers", "0"])
launch.main(["search", "--collection", coll, phone])
launch.main(["probe", "predict", "--collection", coll, "--knn", phone])
try:
    handlers.decode_upload(AppContext.open(coll), phone)
except handlers.UserError as e:
    print("web UI:", e)
"""


def test_heic_without_its_decoder_says_how_to_get_it(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """Without pillow-heif, an iPhone's photo was "not an image" to every command but index."""
    from indexes.build import IndexReport

    said = IndexReport(skipped={".heic": 3, ".psd": 1}).summary()
    assert said.endswith("types .heic (3), .psd (1) (for .heic: pip install pillow-heif)")
    assert "pillow-heif" not in IndexReport(skipped={".psd": 1}).summary()
    heif = pytest.importorskip("pillow_heif")  # to write the photo
    heif.from_pillow(image(91, (64, 48))).save(images / "cat" / "phone.heic", quality=95)
    argv = [str(images), str(tmp_path / "coll"), str(encoder_dir)]
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_HEIF, *argv], capture_output=True, text=True, cwd=ROOT
    )
    out, err = run.stdout, run.stderr
    hint = "(for .heic: pip install pillow-heif)"
    assert f"1 file skipped: unsupported type .heic {hint}" in out
    assert f"moco-search search: error: not an image: {images}/cat/phone.heic {hint}" in err
    assert f"moco-search probe: error: not an image: {images}/cat/phone.heic {hint}" in err
    assert f"web UI: Cannot use phone.heic: not an image {hint}" in out
    assert "Traceback" not in err


def test_hidden_and_nas_folders_are_passed_over_and_counted(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A photo library on a NAS or a drive from a Mac holds thumbnails (``@eaDir`` has resized
    copies of every photo, ``.thumbnails``), ``.DS_Store`` and ``._IMG.jpg`` resource forks: they
    were indexed as near-duplicates of the photos, and each ``._`` file as an error row."""
    for folder in (".thumbnails", "@eaDir/000.png"):
        (images / "cat" / folder).mkdir(parents=True)
        image(91).resize((16, 12)).save(images / "cat" / folder / "SYNOFILE_THUMB_M.png")
    (images / "dog" / "._000.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (images / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    coll = tmp_path / "coll"
    args = ["index", str(images), "--collection", str(coll), "--workers", "0"]
    assert launch.main([*args, "--encoder", str(encoder_dir)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("16 images in the collection, 0 exact copies besides (16 new")
    assert first.endswith(
        "errors: none; 4 hidden files or folders passed over (first: cat/.thumbnails)"
    )
    with Collection.open(coll) as c:
        assert c.errors() == [] and len(c) == 16
    from moco import list_images

    assert len(list_images(images)) == 16  # pretraining passes them over too


@pytest.fixture(scope="module")
def kept_inside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images with a real run (``images/runs/a``) and its encoder (``images/encoder``) inside."""
    images = tmp_path_factory.mktemp("kept") / "images"
    write_images(images, {"cat": 6, "dog": 6, "owl": 4})
    run = images / "runs" / "a"
    tiny = ["--image-size", "32", "--batch-size", "4", "--moco-k", "16", "--workers", "0"]
    assert launch.main(["pretrain", str(images), "--out", str(run), *tiny, "--epochs", "1"]) == 0
    encoder = images / "encoder"
    assert launch.main(["export", str(run / "checkpoint_last.pt"), "--out", str(encoder)]) == 0
    assert (run / "curves.png").is_file() and (encoder / "model.safetensors").is_file()
    return images


def test_a_run_and_an_encoder_kept_in_the_image_folder_are_passed_over(
    kept_inside: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``pretrain photos --out photos/runs/a``: the run's curves.png was a training image of
    the next run and an image of the collection, and its checkpoint, config and log were
    counted as skipped files."""
    from moco import list_images

    images, encoder = kept_inside, kept_inside / "encoder"
    capsys.readouterr()
    assert len(list_images(images)) == 16  # the next run trains on the photos alone
    coll = tmp_path / "coll"
    assert (
        launch.main(["index", str(images), "--collection", str(coll), "--encoder", str(encoder)])
        == 0
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("16 images in the collection") and first.endswith("errors: none")
    assert len(list_images(images / "runs" / "a")) == 1  # a folder given itself is the user's


def test_a_run_an_encoder_or_images_given_for_a_collection_say_what_to_do(
    kept_inside: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Newcomers give a run, an encoder or their photos where a collection goes, and a
    checkpoint or a collection where an encoder goes: each is named, with the next command."""
    run, encoder = kept_inside / "runs" / "a", kept_inside / "encoder"
    coll = tmp_path / "coll"
    assert (
        launch.main(
            ["index", str(kept_inside), "--collection", str(coll), "--encoder", str(encoder)]
        )
        == 0
    )
    capsys.readouterr()
    ckpt = run / "checkpoint_last.pt"
    for argv, said in [
        (
            ["info", "--collection", str(run)],
            f"{run} is a pretraining run, not a collection: "
            f"export its encoder (moco-search export {ckpt} --out {run / 'encoder'}), then index",
        ),
        (
            ["search", "--collection", str(encoder), "--id", "1"],
            f"{encoder} is an encoder, not a "
            f"collection: index your images with it (moco-search index IMAGES --collection C "
            f"--encoder {encoder})",
        ),
        (
            ["app", "--collection", str(kept_inside), "--ready-and-exit"],
            f"{kept_inside} is an "
            f"image folder, not a collection: index it first (moco-search index {kept_inside} "
            "--collection images.coll)",
        ),
        (
            ["info", "--collection", str(tmp_path)],
            f"Not a collection (no manifest.json): {tmp_path}",
        ),
        (
            [
                "index",
                str(kept_inside),
                "--collection",
                str(tmp_path / "c2"),
                "--encoder",
                str(ckpt),
            ],
            f"{ckpt} is a training checkpoint, not an encoder: export it first (moco-search export "
            f"{ckpt} --out {run / 'encoder'})",
        ),
        (
            [
                "index",
                str(kept_inside),
                "--collection",
                str(tmp_path / "c2"),
                "--encoder",
                str(coll),
            ],
            f"{coll} is a collection, not an encoder: moco-search info --collection {coll} names",
        ),
        *(  # ... and where a collection is written: it came out empty in the photos, rc 0
            (
                ["index", str(kept_inside), "--collection", str(where), "--encoder", str(encoder)],
                said,
            )
            for where, said in [
                (
                    kept_inside,
                    f"{kept_inside} is an image folder, not a collection: index it first",
                ),
                (encoder, f"{encoder} is an encoder, not a collection: index your images"),
                (run, f"{run} is a pretraining run, not a collection: export its encoder"),
                (
                    tmp_path,
                    f"{tmp_path} holds other files (coll) and no collection: give a new or "
                    "empty folder for the collection",
                ),
            ]
        ),
    ]:
        before = {p: sorted(os.listdir(p)) for p in (kept_inside, encoder, run, tmp_path)}
        assert launch.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert {p: sorted(os.listdir(p)) for p in before} == before  # not even an index.lock
    assert not (tmp_path / "c2").exists()
    # export RUN means its last checkpoint (it said "export its encoder first", to export)
    assert launch.main(["export", str(run), "--out", str(tmp_path / "enc")]) == 0
    again = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert (
        again["content_hash"] == json.loads((encoder / "config.json").read_text())["content_hash"]
    )
