"""The commands end to end through ``launch.main``, as a user runs them."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import launch
from indexes import Collection
from moco import TrainConfig
from tests.indexes.conftest import image


@pytest.fixture
def coll(
    images: Path,
    encoder_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> Path:
    caplog.set_level(logging.INFO)
    shutil.copy(images / "cat" / "000.png", images / "cat" / "copy.png")
    out = tmp_path / "c"
    rc = launch.main(
        [
            "index",
            str(images),
            "--collection",
            str(out),
            "--encoder",
            str(encoder_dir),
            "--workers",
            "0",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr()
    assert "16 images in the collection, 1 exact copy besides (17 new" in printed.out
    assert "images in the collection" not in caplog.text  # printed once, not also logged
    return out


def test_search_table_and_json(coll: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    q = images / "dog" / "002.png"
    assert launch.main(["search", "--collection", str(coll), str(q), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "id", "label", "path"]
    assert len(lines) == 4 and lines[1].split()[-1] == str(q.resolve())
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]  # ranks are 1-based
    assert (
        launch.main(
            ["search", "--collection", str(coll), str(q), "-k", "3", "--json", "--label", "cat"]
        )
        == 0
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and {r["label"] for r in rows} == {"cat"}
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert (
        launch.main(
            ["search", "--collection", str(coll), "--id", str(rows[0]["id"]), "--json", "-k", "1"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["id"] == rows[0]["id"]
    # Nothing found: why, where the filters say it
    with Collection.open(coll) as c:
        c.set_user_labels({rows[0]["id"]: "favourite"})  # as "Label it" in the web UI does
    for flags, why in [
        (["--label", "cta"], "no image is labelled 'cta' (labels: cat, dog, owl)"),
        (["--label", "favourite"], "'favourite' is a label given in the web UI, for probes"),
        (["--min-score", "1.5"], "--min-score 1.5: scores are cosine similarities, at most 1"),
        (["--glob", "zebra/*"], "no indexed image passes the filters"),
    ]:
        assert launch.main(["search", "--collection", str(coll), str(q), *flags]) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 1 and f"no results: {why}" in err, (flags, err)
    huge = "9" * 22  # past SQLite's integers: a traceback (OverflowError)
    assert launch.main(["search", "--collection", str(coll), str(q), "--min-width", huge]) == 2
    assert f"error: the minimum width must be from 0 to 1,048,576 pixels, got {huge}" in (
        capsys.readouterr().err
    )


def test_reading_a_collection_does_not_wait_for_torch(coll: Path, images: Path) -> None:
    """``info``, search by id, ``duplicates`` and ``export-embeddings`` read stored vectors and
    configs only: importing torch and torchvision took them 7 s and 860 MB instead of 0.8 s and
    90 MB. A search by image needs torch (which shows the check below can fail), not
    torchvision: its import took another 3 s (torch._dynamo, through torchvision.ops; a
    ``with torch.device("meta")`` imports it too). Nor pandas, which sqlite-utils imports when it
    is installed (0.5 s of each command); whoever wants pandas later still gets it. An index run
    that finds nothing to embed needs neither."""
    c = ["--collection", str(coll)]
    reads = [
        ["index", str(images), *c],  # nothing new: an unchanged nightly run took 6 s, now 1
        ["info", *c],
        ["search", *c, "--id", "1"],
        ["duplicates", *c],
        ["export-embeddings", *c, "--out", str(coll.parent / "emb")],
    ]
    heavy = ("pandas", "torch", "torch._dynamo", "torchvision")
    loaded = f"sorted(m for m in {heavy!r} if m in sys.modules)"
    code = (
        f"import sys, launch\nfor argv in {reads!r}:\n    assert launch.main(argv) == 0, argv\n"
        f"print('before', {loaded})\n"
        f"assert launch.main({['search', *c, str(images / 'dog' / '002.png')]!r}) == 0\n"
        f"print('after', {loaded})\n"
        "import pandas\nprint('then', pandas.DataFrame({'a': [1]}).shape)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(launch.__file__).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "before []" in lines and "after ['torch']" in lines, run.stdout[-2000:]
    assert "then (1, 1)" in lines
    assert "collection " in run.stdout and (coll.parent / "emb" / "embeddings.npy").is_file()


def test_user_mistakes_are_one_line(
    coll: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert launch.main(["search", "--collection", str(coll), str(tmp_path / "no.png")]) == 2
    assert launch.main(["search", "--collection", str(tmp_path / "nothing"), "x.png"]) == 2
    assert launch.main(["index", "--collection", str(tmp_path / "new")]) == 2
    assert launch.main(["search", "--collection", str(coll), "--id", "999999"]) == 2
    assert launch.main(["search", "--collection", str(coll), "--id", "1", "--device", "gpu"]) == 2
    assert launch.main(["search", "--collection", str(coll), "--id", "1", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and all(e.startswith("moco-search ") for e in err)
    assert err[5].endswith("give query images or --id, not both (--negative goes with images)")
    assert err[3].endswith(f"No image with id 999999 in {coll}")
    assert err[4].endswith("--device 'gpu' is not a torch device (cpu, cuda, cuda:1, mps, ...)")
    assert "no.png" in err[0]
    assert "nothing" in err[1] and "x.png" not in err[1]  # the wrong collection comes first
    junk = tmp_path / "junk.jpg"
    junk.write_text("not a picture")
    assert launch.main(["search", "--collection", str(coll), str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moco-search search: error: not an image: {junk}", err  # no Pillow internals


def test_reindex_without_arguments_rescans(
    coll: Path, images: Path, capsys: pytest.CaptureFixture
) -> None:
    (images / "owl" / "000.png").unlink()
    assert launch.main(["index", "--collection", str(coll), "--workers", "0"]) == 0
    assert "1 removed, 16 unchanged" in capsys.readouterr().out


def test_duplicates_match_brute_force(coll: Path, capsys: pytest.CaptureFixture) -> None:
    with Collection.open(coll) as c:
        ids = c.labeled()[0]
        vecs = c.vectors(ids)
        sims = np.sort((vecs @ vecs.T)[np.triu_indices(len(ids), 1)])
        threshold = float(sims[-5] + sims[-4]) / 2  # 4 pairs above it, none on it
        groups = c.duplicates(threshold)
        copy = c.query_records("images.status = 'duplicate'")[0]
    sim = dict(zip(ids.tolist(), vecs, strict=True))
    pairs = {
        (int(a), int(b))
        for a, b in zip(*np.nonzero(np.triu(vecs @ vecs.T >= threshold, 1)), strict=True)
    }
    pairs = {(int(ids[a]), int(ids[b])) for a, b in pairs}
    grouped = [{h.id for h in g} for g in groups]
    for a, b in pairs:  # every near pair's images are grouped (not always together: stars)
        assert any(a in g for g in grouped) and any(b in g for g in grouped)
    for g in groups:  # every score is the exact cosine to the leader, none below the threshold
        lead = g[0]
        for h in g[1:]:
            if h.id in sim:
                assert h.score == pytest.approx(float(sim[h.id] @ sim[lead.id]), abs=1e-4)
            assert h.score >= threshold
    assert any({copy.id, copy.duplicate_of} <= g for g in grouped)
    assert (
        launch.main(
            ["duplicates", "--collection", str(coll), "--threshold", str(threshold), "--json"]
        )
        == 0
    )
    assert [[h["id"] for h in g] for g in json.loads(capsys.readouterr().out)] == [
        [h.id for h in g] for g in groups
    ]


@pytest.mark.parametrize("threshold", ["-5", "0"])  # nan: every float flag's parser refuses it
def test_a_duplicates_threshold_that_is_no_similarity_is_refused(
    coll: Path, threshold: str, capsys: pytest.CaptureFixture
) -> None:
    argv = ["duplicates", "--collection", str(coll), "--threshold", threshold]
    assert launch.main(argv) == 2  # -5 put every image in a group
    assert "threshold must be above 0 (a cosine similarity)" in capsys.readouterr().err


def test_star_groups_never_chain() -> None:
    """A chain a-b-c-d (each pair 0.96, ends far apart) is not one group of four."""
    from indexes.duplicates import star_groups

    near = {1: {2: 0.96}, 2: {1: 0.96, 3: 0.96}, 3: {2: 0.96, 4: 0.96}, 4: {3: 0.96}}
    groups = star_groups(near, copies=[(9, 4)])
    assert [g.ids for g in groups] == [[2, 1, 3], [4, 9]]  # 9 is an exact copy of 4
    assert all(g.min_score >= 0.96 for g in groups)


def test_export_embeddings(coll: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        launch.main(["export-embeddings", "--collection", str(coll), "--out", str(tmp_path / "x")])
        == 0
    )
    emb, ids = np.load(tmp_path / "x" / "embeddings.npy"), np.load(tmp_path / "x" / "ids.npy")
    with open(tmp_path / "x" / "metadata.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert emb.shape == (16, 512) and emb.dtype == np.float32 and len(rows) == 17
    with Collection.open(coll) as c:
        np.testing.assert_array_equal(emb, c.vectors(ids))
    assert {int(r["id"]) for r in rows if r["status"] == "ok"} == set(ids.tolist())
    a_file = tmp_path / "x" / "ids.npy"
    assert launch.main(["export-embeddings", "--collection", str(coll), "--out", str(a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--out {a_file} is a file: give a folder")
    npz = tmp_path / "vectors.npz"  # named like a file: it would have become a folder
    assert launch.main(["export-embeddings", "--collection", str(coll), "--out", str(npz)]) == 2
    err = capsys.readouterr().err.strip()
    assert "named like a file" in err and f"such as {tmp_path / 'vectors'}" in err
    assert not npz.exists() and len(err.splitlines()) == 1


def test_every_command_has_help() -> None:
    _, sub = launch.build_parser()
    for name in ("index", "search", "duplicates", "export-embeddings"):
        text = sub[name].format_help()
        for action in sub[name]._actions:
            if action.help and action.option_strings and action.dest != "help":
                assert "default" in action.help or action.required, (name, action.dest)
        assert text.startswith("usage:") and f" {name} " in text.splitlines()[0]


def test_a_folder_query_and_a_bad_file_among_good_ones(
    coll: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert launch.main(["search", "--collection", str(coll), str(images / "dog")]) == 2
    assert "is a folder: give image files" in capsys.readouterr().err
    url = "https://example.com/cat.jpg"  # was "not found" (probe predict: "https:/example...")
    for command in ("search", "probe predict"):
        assert launch.main([*command.split(), "--collection", str(coll), url]) == 2
        said = capsys.readouterr().err
        assert f"{url} is a web address: moco-search reads image files on this" in said
        assert said.endswith(f"download it first (curl -O {url})\n")
    launch.main(["probe", "train", "--collection", str(coll)])
    capsys.readouterr()
    bad = tmp_path / "bad.txt"
    bad.write_text("not an image")
    good = images / "dog" / "002.png"
    rc = launch.main(["probe", "predict", "--collection", str(coll), str(bad), str(good)])
    out, err = capsys.readouterr()
    assert rc == 1  # something was skipped
    assert f"{bad}: skipped: not an image" in err and "Traceback" not in err
    assert out.startswith(f"{good}: ") and len(out.splitlines()) == 1  # the good one, predicted


def test_probe_predict_classifies_a_folder_chunk_by_chunk(
    coll: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A folder given to ``probe predict`` is classified image by image, as ``index`` reads a
    folder (it said "is a folder: give image files"); a file it cannot read is skipped and the
    others of its chunk are still classified, in order. A JPEG above Pillow's pixel limit is
    decoded at reduced scale, as search decodes it: it was skipped as a "decompression bomb"
    beside a broken file, and refused when given alone (Pillow's limit lowered here so that an
    800x400 file stands for a 108 MP photo)."""
    import indexes.probe_cli

    monkeypatch.setattr(indexes.probe_cli, "PREDICT_CHUNK", 4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    assert launch.main(["probe", "train", "--collection", str(coll)]) == 0
    new = tmp_path / "new"
    shutil.copytree(images / "dog", new / "dogs")  # 000-005.png
    shutil.copytree(images / "owl", new / ".thumbnails")  # hidden: passed over, as index does
    (new / "dogs" / "002.png").write_bytes(b"broken")  # the first chunk: 000-002.png, 002a.jpg
    pano = new / "dogs" / "002a.jpg"
    image(5, size=(800, 400)).save(pano, quality=90)
    (new / "notes.txt").write_text("not an image: not tried")
    (new / "empty").mkdir()
    capsys.readouterr()
    assert launch.main(["probe", "predict", "--collection", str(coll), str(new)]) == 1
    out, err = capsys.readouterr()
    names = [line.split(": ")[0] for line in out.splitlines()]
    assert names == [str(new / "dogs" / f"00{i}") for i in ("0.png", "1.png", "2a.jpg")] + [
        str(new / "dogs" / f"00{i}.png") for i in (3, 4, 5)
    ]
    assert err.splitlines() == [
        f"moco-search probe predict: {new / 'dogs' / '002.png'}: skipped: not an image"
    ]
    assert launch.main(["probe", "predict", "--collection", str(coll), str(new / "empty")]) == 2
    assert f"{new / 'empty'}: no image files in this folder (.avif " in capsys.readouterr().err
    assert launch.main(["probe", "predict", "--collection", str(coll), str(pano)]) == 0
    assert capsys.readouterr().out.startswith(f"{pano}: ")
    bad, fifo = new / "dogs" / "empty.png", new / "fifo.png"  # one file: named, as search does
    bad.write_bytes(b"")
    assert launch.main(["probe", "predict", "--collection", str(coll), str(bad)]) == 2
    assert capsys.readouterr().err.endswith(f"error: empty file: {bad}\n")
    os.mkfifo(fifo)  # "not found", though it is there
    assert launch.main(["probe", "predict", "--collection", str(coll), str(fifo)]) == 2
    assert capsys.readouterr().err.endswith(f"error: Image {fifo} is not a regular file\n")


def test_index_budget_and_float16_flags_then_search_shows_recall(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    c = str(tmp_path / "c")
    args = ["index", str(images), "--collection", c, "--encoder", str(encoder_dir)]
    assert launch.main([*args, "--max-index-memory", "1GB", "--vector-dtype", "float16"]) == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["vector_dtype"] == "float16" and m["index"]["max_index_memory"] == 10**9
    capsys.readouterr()
    assert launch.main(["search", "--collection", c, "--id", "1", "-k", "2"]) == 0
    assert "recall@10 1.000" in capsys.readouterr().err
    assert launch.main(["index", "--collection", c, "--max-index-memory", "lots"]) == 2


def test_an_encoder_named_by_its_weights_file_and_a_run_named_as_an_encoder(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = encoder_dir / "model.safetensors"
    args = ["index", str(images), "--workers", "0", "--collection"]
    assert launch.main([*args, str(tmp_path / "c"), "--encoder", str(weights)]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["encoder"]["path"] == str(encoder_dir.resolve())  # the encoder, not its file
    # A run directory holds a config.json too (a TrainConfig, which also names an arch).
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps(dataclasses.asdict(TrainConfig(data="x", out=str(run))))
    )
    capsys.readouterr()
    assert launch.main([*args, str(tmp_path / "c2"), "--encoder", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"{run} is a pretraining run, not an encoder: export its encoder first "
        f"(moco-search export {run / 'checkpoint_last.pt'} --out {run / 'encoder'})"
    ), err
    assert not (tmp_path / "c2").exists()


def test_ctrl_c_while_indexing_keeps_what_was_embedded_and_says_so(
    images: Path,
    encoder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    import indexes.embed

    embed, calls = indexes.embed.embed_decoded, []

    def interrupted_at_the_third_batch(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return embed(*args)

    monkeypatch.setattr(indexes.embed, "embed_decoded", interrupted_at_the_third_batch)
    out = tmp_path / "c"
    cmd = ["index", str(images), "--collection", str(out), "--encoder", str(encoder_dir)]
    cmd += ["--workers", "0", "--batch-size", "4"]
    caplog.set_level(logging.INFO)
    assert launch.main(cmd) == 130
    assert "interrupted: the 8 of 16 images embedded so far are kept" in caplog.text
    assert "index: interrupted" in capsys.readouterr().err
    assert len(Collection(out).search_id(1, k=16)) == 8  # searchable as it is
    monkeypatch.setattr(indexes.embed, "embed_decoded", embed)
    assert launch.main(cmd) == 0
    assert "(8 new, 0 updated, 0 renamed, 0 removed, 8 unchanged)" in capsys.readouterr().out


def test_a_moved_encoder_is_named_and_search_by_id_still_works(
    images: Path, encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    enc = Path(shutil.copytree(encoder_dir, tmp_path / "enc"))
    out = tmp_path / "c"
    assert launch.main(["index", str(images), "--collection", str(out), "--encoder", str(enc)]) == 0
    shutil.rmtree(enc)
    capsys.readouterr()
    assert launch.main(["search", "--collection", str(out), "--id", "1", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # stored vectors need no encoder
    query = str(images / "cat" / "000.png")
    assert launch.main(["search", "--collection", str(out), query]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"moco-search search: error: The encoder of collection {out} is not at {enc} (moved or "
        f"deleted?): embedding a new image needs it. If it moved, `moco-search index "
        f"--collection {out} --encoder DIR` records where (nothing is embedded again)"
    )


def test_a_published_encoder_that_fails_its_check_says_why(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """argparse said "invalid _encoder_arg value: 'moco_v2_800ep'" for any such failure."""
    monkeypatch.setenv("MOCO_SEARCH_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "cache" / "published" / "moco_v2_800ep" / "moco_v2_800ep_pretrain.pth.tar"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a truncated download")  # present: nothing is fetched
    argv = ["index", str(images), "--collection", str(tmp_path / "c"), "--encoder"]
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, as for any bad flag
        launch.main([*argv, "moco_v2_800ep"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        "argument --encoder: moco_v2_800ep: the download does not match md5 a04e12f8; removed it"
    ), err
    assert not ckpt.exists()


def test_a_reader_that_stops_reading_ends_the_command_quietly(coll: Path) -> None:
    """``moco-search search ... --json | head -1``: the pipe closes while we write; a
    BrokenPipeError traceback (or Python's "Exception ignored" at exit) is not for the user."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "launch.py"), "search", "--collection", str(coll)]
    proc = subprocess.Popen(
        [*cmd, "--id", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the command (seconds of imports) writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_a_run_that_leaves_no_image_says_why_not_what_next(
    encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A wrong folder printed "0 images in the collection" and then "next: moco-search
    search ...", as if all were well."""
    empty, junk = tmp_path / "empty", tmp_path / "junk"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "a.txt").write_text("not an image")
    junk.mkdir()
    for name in ("a.png", "b.jpg"):
        (junk / name).write_text("not an image either")
    for folder, said in [
        (empty, f"{empty} holds no image files (avif bmp gif heic heif ico jpeg jpg png"),
        (junk, "none of the 2 image files could be read (the reasons above)"),
    ]:
        args = ["index", str(folder), "--collection", str(tmp_path / folder.name / "c")]
        assert launch.main([*args, "--encoder", str(encoder_dir), "--workers", "0"]) == 0
        printed = capsys.readouterr()
        assert said in printed.err and "next:" not in printed.out


def test_reembed_says_which_probe_to_train_again(
    coll: Path,
    images: Path,
    other_encoder_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    assert launch.main(["probe", "train", "--collection", str(coll)]) == 0
    capsys.readouterr()
    index = ["index", "--collection", str(coll), "--encoder", str(other_encoder_dir)]
    assert launch.main([*index, "--workers", "0"]) == 2  # refused: names the way out
    assert f"--encoder {other_encoder_dir} --reembed" in capsys.readouterr().err
    assert launch.main([*index, "--workers", "0", "--reembed"]) == 0
    printed = capsys.readouterr()
    assert "16 re-embedded with the new encoder" in printed.out
    assert (
        "probe 'default' was trained on the old encoder's features and is refused from now on: "
        f"run `moco-search probe train --collection {coll}`" in printed.err
    )
    good = images / "dog" / "002.png"
    assert launch.main(["probe", "predict", "--collection", str(coll), str(good)]) == 2
    assert "train a new probe for this encoder" in capsys.readouterr().err
    assert launch.main(["probe", "train", "--collection", str(coll)]) == 0
    assert launch.main(["probe", "predict", "--collection", str(coll), str(good)]) == 0


def test_names_with_control_characters_print_on_one_line_each(
    tmp_path: Path, encoder_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A file named with a newline split its hit across two lines of the table, and a name with
    an escape sequence drove the terminal; JSON keeps the names as they are."""
    images = tmp_path / "in\nbox"  # the folder: both a root and, below it, a label
    (images / "red\x1b[31m").mkdir(parents=True)
    for i, name in enumerate(["a\nb.png", "tab\there.png", "\x1b]0;pwned\x07.png"]):
        image(i).save(images / "red\x1b[31m" / name)
    image(0).save(images / "red\x1b[31m" / ".hidden\n.png")
    coll = str(tmp_path / "c")
    launch.main(["index", str(images), "--collection", coll, "--encoder", str(encoder_dir)])
    q = str(images / "red\x1b[31m" / "a\nb.png")
    for argv in (
        ["index", "--collection", coll],
        ["search", "--collection", coll, q, "-k", "3"],
        ["duplicates", "--collection", coll, "--threshold", "0.5"],
        ["info", "--collection", coll],
    ):
        assert launch.main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "\t" not in out, argv
        if argv[0] == "search":
            lines = out.splitlines()
            assert len(lines) == 4 and all(line.split()[0] in "123" for line in lines[1:])
            assert f"{tmp_path}/in\\nbox/red\\x1b[31m/a\\nb.png" in lines[1]
            assert "red\\x1b[31" in lines[1]  # the label, cut to 12 characters
        if argv[0] == "duplicates":
            assert "\\x1b]0;pwned\\x07.png" in out and len(out.splitlines()) == 4
        if argv[0] == "index":
            assert "passed over (first: red\\x1b[31m/.hidden\\n.png)" in out
        if argv[0] == "info":
            assert f"folder: {tmp_path}/in\\nbox (3 images)" in out
    assert launch.main(["search", "--collection", coll, q, "--label", "blue"]) == 0
    assert "(labels: red\\x1b[31m)" in capsys.readouterr().err
    launch.main(["search", "--collection", coll, q, "-k", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["path"] == q  # JSON escapes them itself
