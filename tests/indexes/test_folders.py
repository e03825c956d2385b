"""A collection's folders that moved or went for good: ``--move-root`` and ``--forget-root``."""

from __future__ import annotations

from pathlib import Path

import pytest

import launch
from indexes import Collection, index_images
from tests.indexes.conftest import consistency, write_images
from tests.indexes.test_faults import error_line, index_cli


def index(coll: Path, *extra: str) -> int:
    return launch.main(["index", "--collection", str(coll), "--workers", "0", *extra])


def paths_by_id(coll: Path) -> dict[int, str]:
    with Collection.open(coll) as c:
        return {r.id: r.relpath for r in c.records(c.labeled()[0])}


@pytest.fixture
def coll(images: Path, encoder_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "coll"
    index_images([images], out, encoder_dir, workers=0)
    with Collection.open(out) as c:
        c.set_user_labels({3: "mine"})
    return out


def test_a_moved_folder_keeps_ids_labels_and_vectors(
    coll: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = paths_by_id(coll)
    moved = images.rename(tmp_path / "elsewhere")
    assert index(coll) == 2  # the nightly re-scan: the way out is in its one line
    assert error_line(capsys, "index") == (
        f"moco-search index: error: Image folder not found: {images}, a folder of collection "
        f"{coll}. If it moved, run again with --move-root {images} NEW_PLACE (ids, labels and "
        f"vectors are kept); to remove its images from the collection, --forget-root {images}"
    )
    assert index(coll, "--move-root", str(images), str(moved)) == 0
    assert "(0 new, 0 updated, 0 renamed, 0 removed, 16 unchanged)" in capsys.readouterr().out
    assert paths_by_id(coll) == before
    with Collection.open(coll) as c:
        assert c.user_labels() == {3: "mine"}
        assert c.manifest["roots"] == [str(moved)]
        hit = c.search_id(5, k=1)[0]
        assert hit.path == str(moved / before[5]) and Path(hit.path).is_file()
    assert index(coll) == 0  # and the nightly re-scan works again
    assert index(coll, "--move-root", str(images), str(moved)) == 0  # again: nothing to move
    assert "(0 new, 0 updated, 0 renamed, 0 removed, 16 unchanged)" in capsys.readouterr().out
    assert consistency(coll) == {"ok": 16}


def test_a_folder_indexed_again_at_its_new_place_is_merged_back(
    coll: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before --move-root, a user indexed the new place: every image became an exact copy of a
    row whose file was gone. Moving the old folder onto it keeps the old rows (ids, labels) and
    drops the copies."""
    before = paths_by_id(coll)
    moved = images.rename(tmp_path / "elsewhere")
    assert index_cli(moved, coll) == 0
    assert "16 exact copies besides" in capsys.readouterr().out
    assert (
        f"{images}, a folder of this collection, is gone. If {moved} is where it moved, stop "
        f"this run and use --move-root {images} {moved} instead" in caplog.text
    )
    assert index(coll, "--move-root", str(images), str(moved)) == 0
    assert "16 images in the collection, 0 exact copies besides" in capsys.readouterr().out
    assert paths_by_id(coll) == before
    with Collection.open(coll) as c:
        assert c.user_labels() == {3: "mine"} and c.manifest["roots"] == [str(moved)]
    assert consistency(coll) == {"ok": 16}


def test_forget_root_removes_a_folder_and_its_images(
    coll: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other"
    write_images(other, {"fox": 3}, start_seed=700)
    assert index_cli(other, coll) == 0
    capsys.readouterr()
    gone = images.rename(tmp_path / "deleted")
    assert index(coll, "--forget-root", str(images)) == 0
    out = capsys.readouterr().out
    assert "3 images in the collection" in out and "16 removed" in out  # it said 0 removed
    with Collection.open(coll) as c:
        assert c.manifest["roots"] == [str(other)]
        assert {r.label for r in c.records(c.labeled()[0])} == {"fox"}
    assert consistency(coll) == {"ok": 3}
    assert index(coll, "--forget-root", str(other)) == 0  # the last one: an empty collection
    assert "0 images in the collection" in capsys.readouterr().out
    assert gone.is_dir()  # the folder itself is never touched


def test_bad_moves_are_refused_before_anything_changes(
    coll: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = paths_by_id(coll)
    (tmp_path / "a-file").write_text("x")
    unrelated = tmp_path / "unrelated"  # a wrong NEW would drop every row it lacks, in silence
    write_images(unrelated, {"fox": 3}, start_seed=700)
    cases = [
        (
            ["--move-root", str(images), str(unrelated)],
            f"--move-root: 16 of the 16 files indexed under {images} are not under {unrelated} "
            "(first: ",
        ),
        (
            ["--move-root", str(images), str(images / "cat")],
            f"--move-root: {images / 'cat'} lies inside {images}, so it is not where",
        ),
        (
            ["--move-root", str(tmp_path / "typo"), str(images)],
            f"{tmp_path / 'typo'} is not a folder of collection {coll}; its folders: {images}",
        ),
        (
            ["--move-root", str(images), str(tmp_path / "nowhere")],
            f"--move-root: image folder not found: {tmp_path / 'nowhere'}",
        ),
        (
            ["--move-root", str(images), str(tmp_path / "a-file")],
            f"--move-root: {tmp_path / 'a-file'} is a file, not a folder",
        ),
        (["--forget-root", str(images / "cat")], "is not a folder of collection"),
    ]
    for extra, said in cases:
        assert index(coll, *extra) == 2, extra
        assert said in error_line(capsys, "index")
    assert paths_by_id(coll) == before
    assert index(tmp_path / "new", "--forget-root", str(images)) == 2
    assert "change a collection that exists" in error_line(capsys, "index")
    assert not (tmp_path / "new").exists()
