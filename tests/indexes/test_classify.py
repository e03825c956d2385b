"""Probes on a real collection: train (cross-validated), predict, kNN, classify-all, CLI."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexes import Collection, index_images
from indexes.classify import (
    classify_all,
    predict_images,
    read_predictions,
    train_collection_probe,
)
from indexes.classify import train_probe as train_labels
from indexes.probe_cli import add_commands
from indexes.probes import list_probes, probe_dir
from moco.probe import ProbeMismatchError, save_probe, train_probe

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def colour_image(rgb: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    px = np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255)
    return Image.fromarray(px.astype(np.uint8))


def build(root: Path, per_class: int, unlabeled: int, encoder: Path) -> Path:
    """ROOT/images/<colour>/i.png (labelled by folder) + ROOT/images/u<i>.png (no label)."""
    seed = 0
    for name, rgb in COLOURS.items():
        (root / "images" / name).mkdir(parents=True)
        for i in range(per_class):
            colour_image(rgb, seed := seed + 1).save(root / "images" / name / f"{i}.png")
    for i in range(unlabeled):
        colour_image(list(COLOURS.values())[i % 3], 100 + i).save(root / "images" / f"u{i}.png")
    index_images([root / "images"], root / "coll", encoder, workers=0, batch_size=8)
    return root / "coll"


@pytest.fixture(scope="module")
def coll(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path) -> Path:
    return build(tmp_path_factory.mktemp("cls"), per_class=5, unlabeled=6, encoder=encoder_dir)


def test_train_cross_validates_and_saves(coll: Path) -> None:
    report = train_collection_probe(coll)
    assert report.classes == ["blue", "green", "red"] and report.n_labeled == 15
    assert report.method == "5-fold cross-validation"
    assert report.metrics.n == 15  # every labelled image tested once by a probe that missed it
    assert report.metrics.top1 >= 80.0 and report.metrics.top5 == 100.0
    lo, hi = report.metrics.top1_ci
    assert lo < report.metrics.top1 <= hi
    assert sum(map(sum, report.metrics.confusion)) == 15
    assert report.confusion_png and report.confusion_png.read_bytes()[:4] == b"\x89PNG"
    meta = list_probes(coll)["default"]
    manifest = json.loads((coll / "manifest.json").read_text())
    assert meta["encoder_hash"] == manifest["encoder"]["content_hash"]
    assert meta["metrics"]["n"] == 15 and "15 held-out" in report.summary()
    # the majority-class rate beside the accuracy, from the same test images
    top, rate = report.majority()
    counts = {c: pc["n"] for c, pc in report.metrics.per_class.items()}
    assert rate == pytest.approx(100.0 * counts[top] / sum(counts.values()))
    assert rate == pytest.approx(100.0 * max(counts.values()) / 15)
    assert f"always guessing the most common label ({top}) scores {rate:.1f}%" in report.summary()


def test_predict_with_probe_and_knn(coll: Path) -> None:
    train_collection_probe(coll)
    files = [coll.parent / "images" / "red" / "0.png", coll.parent / "images" / "blue" / "1.png"]
    for knn in (False, True):
        preds = predict_images(coll, files, knn=knn, knn_k=5)
        assert [p.labels[0] for p in preds] == ["red", "blue"], knn
        for p in preds:
            assert len(p.labels) == 3 and sorted(p.probs, reverse=True) == p.probs
            assert 0.0 < sum(p.probs) <= 1.0 + 1e-5


def test_probe_of_another_encoder_is_refused(coll: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 512)).astype(np.float32)
    save_probe(train_probe(x, ["a", "b"] * 3, encoder_hash="f" * 64), probe_dir(coll, "alien"))
    with pytest.raises(ProbeMismatchError, match="not of"):
        predict_images(coll, [coll.parent / "images" / "u0.png"], name="alien")
    with pytest.raises(FileNotFoundError, match="probe train"):
        predict_images(coll, [coll.parent / "images" / "u0.png"], name="missing")
    with pytest.raises(ValueError, match="probe name"):
        probe_dir(coll, "../escape")


def test_classify_all_stores_predictions(coll: Path) -> None:
    train_collection_probe(coll)
    report = classify_all(coll)
    assert report.n == 6 and sum(report.counts.values()) == 6
    with Collection.open(coll) as c:
        unlabeled = {r.id: r.relpath for r in c.query_records("images.label IS NULL")}
    preds = read_predictions(coll)
    assert set(preds) == set(unlabeled)
    expected = {f"u{i}.png": ["red", "green", "blue"][i % 3] for i in range(6)}
    right = sum(preds[i]["label"] == expected[rel] for i, rel in unlabeled.items())
    assert right >= 5
    assert all(0 < p["confidence"] <= 1 and len(p["top5"]) == 3 for p in preds.values())
    knn = classify_all(coll, knn=True, knn_k=5)  # replaces the table
    assert knn.method.startswith("knn") and {
        p["method"] for p in read_predictions(coll).values()
    } == {knn.method}
    db = sqlite3.connect(coll / "meta.db")
    assert db.execute("SELECT count(*) FROM predictions").fetchone()[0] == 6
    db.close()


def test_few_labels_report_a_wide_interval(tmp_path: Path, encoder_dir: Path) -> None:
    small = build(tmp_path, per_class=2, unlabeled=0, encoder=encoder_dir)
    report = train_collection_probe(small)
    assert report.metrics.n == 6 and report.n_labeled == 6
    lo, hi = report.metrics.top1_ci
    assert hi - lo > 30.0 and "only 6 test images" in report.summary()
    with Collection.open(small) as c:  # a class of one image is never held out
        ids, labels = c.labeled()
    one = train_labels(small, ids.tolist(), ["odd", *labels[1:]])
    assert "odd" not in one.metrics.per_class or not one.metrics.per_class["odd"]["n"]
    untested = next(x for x in one.summary().splitlines() if "never tested" in x)
    assert "odd" in untested and "too few labelled images to hold one out" in untested
    assert "never tested" not in report.summary()


def test_one_class_is_refused(tmp_path: Path, encoder_dir: Path) -> None:
    (tmp_path / "images" / "only").mkdir(parents=True)
    for i in range(3):
        colour_image((200, 0, 0), i).save(tmp_path / "images" / "only" / f"{i}.png")
    index_images([tmp_path / "images"], tmp_path / "coll", encoder_dir, workers=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_collection_probe(tmp_path / "coll")


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["train", "--folds", "1"], "--folds must be 0 (one split) or 2 or more, got 1"),
        (["train", "--folds", "-2"], "--folds must be 0 (one split) or 2 or more, got -2"),
        (["train", "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1, got 1.5"),
        (["classify-all", "--knn", "--knn-k", "0"], "--knn-k must be 1 or more"),
    ],
)
def test_probe_settings_no_probe_can_use_are_refused(
    coll: Path, flags: list[str], said: str
) -> None:
    """Each was accepted: --folds 1 and -2 silently made one split, --val-fraction 1.5 was
    ignored, and --knn-k 0 printed an empty prediction for every image."""
    with pytest.raises(ValueError, match=re.escape(said)):
        run_cli(["probe", flags[0], "--collection", str(coll), *flags[1:]])


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli(coll: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["probe", "train", "--collection", str(coll), "--name", "cli"]) == 0
    assert "probe 'cli'" in capsys.readouterr().out
    img = coll.parent / "images" / "green" / "2.png"
    assert (
        run_cli(
            ["probe", "predict", str(img), "--collection", str(coll), "--name", "cli", "--json"]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["top"][0]["label"] == "green" and len(row["top"]) == 3
    assert (
        run_cli(["probe", "classify-all", "--collection", str(coll), "--knn", "--knn-k", "5"]) == 0
    )
    out = capsys.readouterr().out
    assert "classified 6 unlabelled images" in out and "table predictions (--json" in out
    all_json = ["probe", "classify-all", "--collection", str(coll), "--knn", "--json"]
    assert run_cli([*all_json, "--knn-k", "5"]) == 0
    printed = capsys.readouterr()
    rows = [json.loads(line) for line in printed.out.splitlines()]
    assert len(rows) == 6 and "classified 6" in printed.err  # the summary is not in the JSON
    with Collection.open(coll) as c:
        unlabelled = {r.path for r in c.query_records("images.label IS NULL")}
    assert {r["path"] for r in rows} <= unlabelled
    assert all(r["label"] == r["top5"][0][0] and 0 < r["confidence"] <= 1 for r in rows)
    with pytest.raises(FileNotFoundError):
        run_cli(["probe", "predict", "nope.png", "--collection", str(coll)])
    for top in ("0", "-1"):  # -1 sliced off the last label, 0 printed none
        with pytest.raises(ValueError, match=f"--top must be at least 1, got {top}"):
            run_cli(["probe", "predict", str(img), "--collection", str(coll), "--top", top])


def test_a_damaged_probe_is_named_and_left_out_not_fatal(
    coll: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``probe.json`` cut short (a full disk, a copy) made every list of probes raise
    ``JSONDecodeError``: the web UI did not start and ``info`` failed. Now only that probe is
    left out, said once, and using it names the file and the way out."""
    train_collection_probe(coll)
    broken = probe_dir(coll, "cut")
    broken.mkdir(parents=True)
    (broken / "probe.json").write_text('{"classes": ["a", "b"')
    try:
        assert "default" in list_probes(coll) and "cut" not in list_probes(coll)
        said = [r for r in caplog.records if "probe.json is damaged" in r.getMessage()]
        assert len(said) == 1 and "train the probe 'cut' again" in said[0].getMessage()
        with pytest.raises(ValueError, match=r"probe.json is damaged .*train the probe 'cut'"):
            predict_images(coll, [coll.parent / "images" / "u0.png"], name="cut")
    finally:
        shutil.rmtree(broken)
