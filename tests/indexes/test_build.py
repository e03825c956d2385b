"""index_images: a real encoder, real files, real FAISS and SQLite; incremental runs."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexes import Collection, index_images
from tests.indexes.conftest import consistency, image, write_images


def build(images: Path, coll: Path, enc: Path | None, **kw: object):
    return index_images([images], coll, enc, workers=0, batch_size=4, **kw)


def test_every_image_finds_itself_first(images: Path, encoder_dir: Path, tmp_path: Path) -> None:
    report = build(images, tmp_path / "c", encoder_dir)
    assert (report.added, report.total, report.errors) == (16, 16, {})
    with Collection.open(tmp_path / "c") as c:
        assert len(c) == 16
        ids, _ = c.labeled()
        for rec in c.records(ids):
            hits = c.search(rec.path, k=3)
            assert hits[0].id == rec.id and hits[0].path == rec.path
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert consistency(tmp_path / "c") == {"ok": 16}


def test_search_equals_brute_force(images: Path, encoder_dir: Path, tmp_path: Path) -> None:
    build(images, tmp_path / "c", encoder_dir)
    with Collection.open(tmp_path / "c") as c:
        ids, _ = c.labeled()
        vecs = c.vectors(ids)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        q = c.embed([images / "dog" / "002.png"])[0]
        order = np.argsort(-(vecs @ q), kind="stable")
        hits = c.search(images / "dog" / "002.png", k=5)
        assert [h.id for h in hits] == ids[order[:5]].tolist()
        np.testing.assert_allclose([h.score for h in hits], (vecs @ q)[order[:5]], atol=1e-5)
        assert len(c.search(q, k=100)) == 16  # k > n: no -1 padding surfaces
        assert all(h.id > 0 for h in c.search(q, k=100))


def test_query_by_bytes_and_pil_match_path(images: Path, encoder_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    build(images, tmp_path / "c", encoder_dir)
    p = images / "owl" / "001.png"
    with Collection.open(tmp_path / "c") as c:
        by_path = c.embed([p])
        np.testing.assert_allclose(c.embed([p.read_bytes()]), by_path, atol=1e-5)
        np.testing.assert_allclose(c.embed([Image.open(p)]), by_path, atol=1e-5)


def test_incremental_add_change_delete_rename(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    coll = tmp_path / "c"
    build(images, coll, encoder_dir)
    with Collection.open(coll) as c:
        old = {r.relpath: r for r in c.records(c.labeled()[0])}

    again = build(images, coll, None)  # encoder from the manifest
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 16)

    write_images(images, {"fox": 2}, start_seed=100)  # add 2
    image(200).save(images / "cat" / "000.png")  # change 1
    os.utime(images / "cat" / "001.png", (1, 1))  # touch: same bytes, new mtime
    (images / "dog" / "000.png").unlink()  # delete 1
    (images / "owl" / "000.png").rename(images / "owl" / "renamed.png")  # rename 1
    r = build(images, coll, None)
    assert (r.added, r.updated, r.removed, r.renamed) == (2, 1, 1, 1)
    assert r.unchanged == 16 - 3 and r.total == 17

    with Collection.open(coll) as c:
        new = {x.relpath: x for x in c.records(c.labeled()[0])}
        assert "dog/000.png" not in new and "owl/000.png" not in new
        assert new["owl/renamed.png"].id == old["owl/000.png"].id  # moved, not re-embedded
        assert new["cat/001.png"].id == old["cat/001.png"].id
        assert new["cat/000.png"].id != old["cat/000.png"].id  # new content, new id
        assert c.search(images / "cat" / "000.png", k=1)[0].relpath == "cat/000.png"
        assert c.search(images / "fox" / "001.png", k=1)[0].relpath == "fox/001.png"
    assert consistency(coll) == {"ok": 17}


def test_exact_copies_share_a_vector(images: Path, encoder_dir: Path, tmp_path: Path) -> None:
    coll = tmp_path / "c"
    shutil.copy(images / "cat" / "000.png", images / "cat" / "copy.png")
    r = build(images, coll, encoder_dir)
    assert r.duplicates == 1 and r.total == 16
    with Collection.open(coll) as c:
        (copy,) = c.query_records("images.status = 'duplicate'")
        assert copy.relpath == "cat/copy.png"
        assert c.records([copy.duplicate_of])[0].relpath == "cat/000.png"
        assert [g[0].id for g in c.duplicates(threshold=1.5)] == [copy.duplicate_of]
    r = build(images, coll, None)  # nothing changed: the report still counts the copy it holds
    assert (r.unchanged, r.duplicates, r.total) == (17, 1, 16)
    (images / "cat" / "000.png").unlink()  # the copy inherits the vector
    r = build(images, coll, None)
    assert r.removed == 1 and r.total == 16 and r.duplicates == 0
    with Collection.open(coll) as c:
        hit = c.search(images / "cat" / "copy.png", k=1)[0]
        assert hit.relpath == "cat/copy.png" and hit.score > 0.999
    consistency(coll)


def test_wrong_encoder_is_refused(
    images: Path, encoder_dir: Path, other_encoder_dir: Path, tmp_path: Path
) -> None:
    build(images, tmp_path / "c", encoder_dir)
    with pytest.raises(ValueError, match="Encoder mismatch") as e:
        build(images, tmp_path / "c", other_encoder_dir)
    from moco import read_encoder_config

    for enc in (encoder_dir, other_encoder_dir):
        assert read_encoder_config(enc).content_hash[:16] in str(e.value)
    with pytest.raises(ValueError, match="Encoder mismatch"):
        Collection.open(tmp_path / "c", encoder=other_encoder_dir)


def test_same_weights_at_another_size_are_refused(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """Re-exported in place at another size, the weights hash is unchanged but the vectors are
    not comparable: indexing and searching must refuse it, not mix the two."""
    import json
    import shutil

    enc = tmp_path / "enc"
    shutil.copytree(encoder_dir, enc)
    build(images, tmp_path / "c", enc)
    cfg = json.loads((enc / "config.json").read_text())
    (enc / "config.json").write_text(json.dumps({**cfg, "image_size": cfg["image_size"] + 16}))
    with pytest.raises(ValueError, match=r"Encoder mismatch.*image_size \d+ -> \d+"):
        build(images, tmp_path / "c", enc)
    with pytest.raises(ValueError, match="Encoder mismatch"), Collection.open(tmp_path / "c") as c:
        c.search(next(images.rglob("*.png")), k=1)


def test_one_folder_given_twice_is_indexed_once(
    images: Path, encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``index small ./small/`` scanned the folder twice, and its second copy of each file failed
    the database's unique path with an IntegrityError traceback."""
    monkeypatch.chdir(images.parent)
    r = index_images([Path(images.name), Path(f"./{images.name}/")], tmp_path / "c", encoder_dir)
    assert r.added == r.total > 0 and r.duplicates == 0
    with Collection.open(tmp_path / "c") as c:
        assert c.manifest["roots"] == [str(images)]


def test_an_indexed_folder_given_through_a_symlink_is_rescanned_not_added(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """``index ~/pics`` after ``index /mnt/disk/pics`` (a symlink to it): the folder became a
    second root, each of its images an exact copy of itself."""
    link = tmp_path / "link"
    link.symlink_to(images)
    build(images, tmp_path / "c", encoder_dir)
    r = index_images([link], tmp_path / "c", workers=0)
    assert (r.added, r.unchanged, r.duplicates, r.total) == (0, 16, 0, 16)
    with Collection.open(tmp_path / "c") as c:
        assert c.manifest["roots"] == [str(images)]


def test_a_folder_inside_another_root_is_refused(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """Nested roots put each image of the inner one in the collection twice (as exact copies)."""
    inner = images / "cat"
    with pytest.raises(ValueError, match=f"{inner} lies inside {images}: .* index {images} alone"):
        index_images([images, inner], tmp_path / "c", encoder_dir)
    assert not (tmp_path / "c").exists()
    index_images([inner], tmp_path / "c", encoder_dir)
    with pytest.raises(ValueError, match=f"index {images} into a new collection"):
        index_images([images], tmp_path / "c")  # a new root above an indexed one


def test_new_collection_needs_an_encoder(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="encoder"):
        build(images, tmp_path / "c", None)
    with pytest.raises(FileNotFoundError):
        index_images([tmp_path / "nope"], tmp_path / "c", tmp_path)


def test_labels_csv_overrides_folders(
    images: Path, encoder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = tmp_path / "labels.csv"
    rows = f"cat/000.png,tabby\n{images / 'dog' / '000.png'},pug\ncat/0OO.png,typo\n"
    csv.write_text(f"path,label\n{rows}")
    build(images, tmp_path / "c", encoder_dir, labels_csv=csv)
    with Collection.open(tmp_path / "c") as c:
        assert c.label_counts() == {"cat": 5, "dog": 5, "owl": 4, "pug": 1, "tabby": 1}
    # the row that names no file is said, not silently dropped
    assert f"{csv}: 1 of its 3 rows name no image file under {images}" in caplog.text
    assert "(first: cat/0OO.png); their labels are not applied" in caplog.text


def test_a_labels_csv_is_remembered_until_folder_labels(
    images: Path, encoder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The nightly ``index --collection C`` (and the UI's re-scan) gives no ``--labels``: it set
    every label back to the folder names in silence. Now it reads the CSV given before; if that
    file is gone, indexed images keep their labels (new ones take their folder's name)."""
    coll = tmp_path / "c"
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ncat/000.png,tabby\n")
    build(images, coll, encoder_dir, labels_csv=csv)
    csv.write_text("path,label\ncat/000.png,tabby\ncat/001.png,ginger\n")  # edited since
    build(images, coll, None)
    with Collection.open(coll) as c:
        assert c.label_counts() == {"cat": 4, "dog": 6, "ginger": 1, "owl": 4, "tabby": 1}
    moved = csv.rename(tmp_path / "elsewhere.csv")
    image(500).save(images / "cat" / "new.png")
    build(images, coll, None)
    assert f"{csv}, the labels CSV this collection was indexed with, is gone" in caplog.text
    with Collection.open(coll) as c:
        assert c.label_counts() == {"cat": 5, "dog": 6, "ginger": 1, "owl": 4, "tabby": 1}
    with pytest.raises(ValueError, match="not both"):
        build(images, coll, None, labels_csv=moved, folder_labels=True)
    build(images, coll, None, folder_labels=True)
    moved.rename(csv)  # back, but forgotten
    build(images, coll, None)
    with Collection.open(coll) as c:
        assert c.label_counts() == {"cat": 7, "dog": 6, "owl": 4}


@pytest.mark.parametrize(
    "encoding,delimiter",
    [("utf-8-sig", ","), ("utf-8", ";"), ("utf-16", "\t"), ("utf-8", ",")],
    ids=["Excel CSV UTF-8 (a byte-order mark)", "semicolons", "Excel Unicode text", "plain"],
)
def test_labels_csv_as_spreadsheets_save_it(
    images: Path, encoder_dir: Path, tmp_path: Path, encoding: str, delimiter: str
) -> None:
    """A BOM made the header's first name "\ufeffpath" (refused as having no 'path' column);
    semicolons (Excel in many locales) and UTF-16 were refused too."""
    csv = tmp_path / "labels.csv"
    rows = [("path", "label"), ("cat/000.png", "tabby; striped"), ("dog/000.png", "pug")]
    quoted = [[f'"{v}"' if delimiter in v else v for v in row] for row in rows]
    csv.write_text("\r\n".join(delimiter.join(r) for r in quoted) + "\r\n", encoding=encoding)
    build(images, tmp_path / "c", encoder_dir, labels_csv=csv)
    with Collection.open(tmp_path / "c") as c:
        counts = c.label_counts()
    assert counts["tabby; striped"] == 1 and counts["pug"] == 1 and counts["cat"] == 5


def test_a_labels_csv_that_is_not_text_says_so(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"path,label\ncat/000.png,caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"labels.csv is not UTF-8 text \(byte 0xe9 at offset"):
        build(images, tmp_path / "c", encoder_dir, labels_csv=csv)


def test_a_labels_csv_row_that_cannot_mean_what_it_says_is_refused_by_line(
    images: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    """Each was accepted in silence: a path labelled twice (the last won), an unquoted comma
    (the label became the path's second half), a quote never closed (the label ran to the end
    of the file). An empty label is no label, and spaces around one are not part of it."""
    csv = tmp_path / "labels.csv"
    for text, said in [
        (
            "path,label\ncat/000.png,tabby\ndog/000.png,pug\ncat/000.png,pug\n",
            "cat/000.png is labelled twice, 'tabby' (line 2) and 'pug' (line 4)",
        ),
        ("path,label\ncat/000.png,a,b\n", "line 2: 3 fields where the header has 2"),
        ("path,label\ncat/000.png\n", "line 2: 1 field where the header has 2"),
        ('path,label\ncat/000.png,"tabby\ndog/000.png,pug\n', "line 3: a quote is opened"),
    ]:
        csv.write_text(text)
        with pytest.raises(ValueError, match=re.escape(said)):
            build(images, tmp_path / "c", encoder_dir, labels_csv=csv)
        assert not (tmp_path / "c").exists()
    csv.write_text(  # a trailing column of the header's own may be left out
        "path,label,note\ncat/000.png,  tabby ,x\ncat/001.png,\ncat/000.png,tabby\n"
    )
    build(images, tmp_path / "c", encoder_dir, labels_csv=csv)
    with Collection.open(tmp_path / "c") as c:
        counts = c.label_counts()
    assert counts["tabby"] == 1 and counts["cat"] == 4 and "" not in counts


def test_a_collection_inside_its_images_folder_does_not_index_itself(
    images: Path, encoder_dir: Path
) -> None:
    coll = images / "my-collection"
    first = index_images([images], coll, encoder_dir, workers=0)
    (coll / "thumbs" / "ab").mkdir(parents=True)
    image(99).save(coll / "thumbs" / "ab" / "thumb.webp")  # as the UI keeps its thumbnails
    image(98).save(images / "new.png")
    again = index_images([], coll, workers=0)
    assert again.added == 1 and again.total == first.total + 1
    with Collection.open(coll) as c:
        assert not [r for r in c.query_records("1") if "my-collection" in r.path]
