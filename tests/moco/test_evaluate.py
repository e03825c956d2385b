"""evaluate() end to end on tiny PNG folders; retrieval metrics against hand-computed values."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.encoders import build_encoder
from moco.eval_cli import add_eval_command
from moco.evaluate import EvalConfig, evaluate, format_table, image_folder, load_featurizer
from moco.export import EncoderConfig, save_encoder
from moco.metrics import retrieval_metrics
from moco.probe import ProbeConfig

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def make_tree(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    make_tree(root / "train", per_class=4, seed=0)
    make_tree(root / "val", per_class=2, seed=1)
    (root / "train" / "class0" / "broken.png").write_bytes(b"not a png")  # skipped, counted
    (root / "val" / "unknown").mkdir()  # a class the training tree lacks: left out
    Image.new("RGB", (32, 32)).save(root / "val" / "unknown" / "x.png")
    save_encoder(
        build_encoder("resnet18", small_stem=True),
        EncoderConfig(
            arch="resnet18", small_stem=True, feature_dim=512, image_size=32, crop_pct=1.0
        ),
        root / "enc",
    )
    return root


FAST = EvalConfig(k=5, monitor_size=6, batch_size=8)


def test_evaluate_encoder_end_to_end(data: Path) -> None:
    r = evaluate(data / "enc", data / "train", data / "val", FAST)
    assert (r["n_train"], r["n_val"], r["skipped"], r["classes"]) == (12, 6, 1, 3)
    assert r["arch"] == "resnet18" and len(r["content_hash"]) == 64 and r["knn_k"] == 5
    for key in (
        "knn_top1",
        "probe_top1",
        "probe_top5",
        "mAP@10",
        "recall@1",
        "recall@5",
        "recall@10",
        "view_recall@1",
    ):
        assert 0.0 <= r[key] <= 100.0, key
    assert r["probe_top5"] == 100.0  # 3 classes: always in the top 5
    assert r["recall@1"] <= r["recall@5"] <= r["recall@10"]
    assert r["monitor_images"] == 6
    table = format_table([r]).splitlines()
    assert table[0].startswith("encoder") and table[2].startswith("enc ")


def test_pixel_baseline_solves_colours(data: Path) -> None:
    r = evaluate("pixels", data / "train", data / "val", FAST)
    assert r["encoder"] == "pixels 16x16" and r["n_train"] == 12
    assert r["knn_top1"] == 100.0 and r["probe_top1"] == 100.0 and r["recall@1"] == 100.0


def test_paper_protocol_and_random_baseline(data: Path) -> None:
    cfg = dataclasses.replace(
        FAST, protocol="paper", probe=dataclasses.replace(ProbeConfig.paper(), epochs=2)
    )
    r = evaluate("random:resnet18:small", data / "train", data / "val", cfg)
    assert r["probe_protocol"] == "paper" and r["probe_config"]["lr"] == 30.0
    assert r["content_hash"].startswith("random-init") and r["image_size"] == 32
    with pytest.raises(ValueError, match="random:ARCH"):
        load_featurizer("random:resnet18:big")
    with pytest.raises(ValueError, match="Unknown arch"):
        load_featurizer("random:vgg")


def test_random_baseline_sees_images_as_its_encoder_does(tmp_path: Path) -> None:
    """``random:ENCODER_DIR``: the encoder's network, input size, pooling and preprocessing with
    random weights, and none of its map, so training is the only difference between the rows."""
    net = build_encoder("resnet18", num_classes=0, small_stem=False)
    fitted = {"mean": torch.full((896,), 5.0)}
    save_encoder(
        net,
        EncoderConfig(
            arch="resnet18",
            feature_dim=896,
            image_size=48,
            crop_pct=1.0,
            pooling="stages",
            mean=(0.5, 0.5, 0.5),
            fit={"kind": "center"},
            training={"epochs": 3},
        ),
        tmp_path / "enc",
        fitted=fitted,
    )
    trained, enc, _ = load_featurizer(tmp_path / "enc")
    model, cfg, name = load_featurizer(f"random:{tmp_path / 'enc'}", seed=3)
    assert (cfg.image_size, cfg.pooling, cfg.crop_pct, cfg.mean) == (48, "stages", 1.0, enc.mean)
    assert cfg.fit == {} and cfg.training == {} and cfg.content_hash == "random-init-seed3"
    assert name == "random-init resnet18 (48 px, stages pooling)"
    x = torch.rand(2, 3, 48, 48)
    with torch.inference_mode():
        out = model(x)
        assert out.shape == (2, 896) == trained(x).shape
        assert not torch.allclose(out, trained(x))  # fresh weights
        assert torch.allclose(trained(x).norm(dim=1), torch.ones(2))  # the encoder's map ...
        assert not torch.allclose(out.norm(dim=1), torch.ones(2))  # ... is not the baseline's
    assert load_featurizer(f"random:{tmp_path / 'enc'}", image_size=64)[1].image_size == 64
    _, again, _ = load_featurizer(f"random:{tmp_path / 'enc'}", seed=3)
    assert again == cfg


def test_cli_writes_json(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers())
    args = parser.parse_args(
        [
            "eval",
            "--encoder",
            "pixels",
            "--train",
            str(data / "train"),
            "--val",
            str(data / "val"),
            "--k",
            "3",
            "--monitor-size",
            "4",
            "--json-out",
            str(tmp_path / "r.json"),
        ]
    )
    assert args.run(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [row["encoder"] for row in rows] == ["pixels 16x16"] and rows[0]["knn_k"] == 3
    assert "knn_top1" in capsys.readouterr().out
    # a path that cannot be written is said before the evaluation, not after it
    for bad, said in [
        (tmp_path, "is a folder: give a file name"),
        (tmp_path / "r.json" / "x.json", "r.json is a file: give a folder"),  # under a file
    ]:
        args.json_out = str(bad)
        with pytest.raises(OSError, match=said):
            args.run(args)
    assert "knn_top1" not in capsys.readouterr().out


def test_eval_refuses_what_would_waste_the_evaluation(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Said before any row is measured: a --val that is the training set, a baseline that does
    not exist (it failed after the encoder's row, minutes in); a --val that shares some images
    with --train is measured, with a warning."""
    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers())

    def run(val: Path, baselines: str = "none") -> int:
        argv = ["eval", "--encoder", "pixels", "--train", str(data / "train"), "--val", str(val)]
        args = parser.parse_args([*argv, "--baselines", baselines, "--monitor-size", "4"])
        return int(args.run(args))

    with pytest.raises(ValueError, match=r"every image of --val .* is also in --train"):
        run(data / "train")
    for bad, said in [
        ("pixels,nope", "'nope' is neither a baseline"),
        ("random:resnet99", "Unknown arch 'resnet99'"),
        ("pixels+blur", r"\+blur; valid: \+center, \+whiten"),
    ]:
        with pytest.raises(ValueError, match=f"--baselines: .*{said}"):
            run(data / "val", bad)
    assert "knn_top1" not in capsys.readouterr().out  # nothing was measured
    val = tmp_path / "val"
    (val / "class0").mkdir(parents=True)
    (val / "class0" / "seen.png").symlink_to(data / "train" / "class0" / "0.png")
    Image.new("RGB", (32, 32)).save(val / "class0" / "new.png")
    with caplog.at_level("WARNING"):
        assert run(val) == 0
    assert "1 of the 2 --val images are --train images too" in caplog.text


def test_eval_prints_the_baselines_beside_an_encoder_by_default(data: Path) -> None:
    """The bar an encoder must clear: raw pixels and its own network with random weights."""
    from moco.eval_cli import default_baselines

    assert default_baselines(str(data / "enc"), "auto") == ["pixels", f"random:{data / 'enc'}"]
    assert default_baselines(str(data / "enc"), "none") == []
    assert default_baselines(str(data / "enc"), "pixels") == ["pixels"]
    assert default_baselines("pixels", "auto") == []  # a baseline needs no baseline
    parser = argparse.ArgumentParser()
    add_eval_command(parser.add_subparsers())
    args = parser.parse_args(["eval", "--encoder", "x", "--train", "t", "--val", "v"])
    assert args.baselines == "auto"


def test_baselines_given_the_encoders_map(data: Path, tmp_path: Path) -> None:
    """A centred encoder is measured beside centred baselines: the map lifts them too."""
    from moco.eval_cli import default_baselines
    from moco.evaluate import evaluate_many, fit_baseline, split_fit

    cfg = json.loads((data / "enc" / "config.json").read_text())
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(
        json.dumps(cfg | {"fit": {"kind": "center", "images": 12, "folder": "/x"}})
    )
    assert default_baselines(str(tmp_path / "enc"), "auto") == [
        "pixels",
        "pixels+center",
        f"random:{tmp_path / 'enc'}",
        f"random:{tmp_path / 'enc'}+center",
    ]
    assert split_fit("pixels+whiten") == ("pixels", "whiten")
    assert split_fit(str(tmp_path / "a+center")) == (str(tmp_path / "a+center"), "none")
    with pytest.raises(ValueError, match=r"\+center, \+whiten"):
        split_fit("pixels+pca")

    raw, centred = evaluate_many(["pixels", "pixels+center"], data / "train", data / "val", FAST)
    assert centred["encoder"] == "pixels 16x16, centred"
    assert raw["knn_top1"] == centred["knn_top1"] == 100.0  # colours stay apart

    model, _, _ = load_featurizer("pixels")
    x = np.random.default_rng(0).random((40, 3 * 16 * 16), dtype=np.float32) + 1.0
    wrapped, train, other = fit_baseline(model, x[:30], x[30:], fit="center")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.linalg.norm(train.mean(0)) < 0.1 and np.linalg.norm(unit.mean(0)) > 0.9
    images = torch.from_numpy(x[30:]).reshape(10, 3, 16, 16)
    np.testing.assert_allclose(wrapped(images).numpy(), other, atol=1e-5)
    # 12 training images cannot whiten 768-d pixels: that row is left out, the others stay
    rows = evaluate_many(["pixels+whiten", "pixels"], data / "train", data / "val", FAST)
    assert [r["encoder"] for r in rows] == ["pixels 16x16"]


@pytest.mark.parametrize(
    ("field", "value"), [("batch_size", 0), ("workers", -1), ("image_size", 0), ("k", 0)]
)
def test_eval_settings_no_run_can_use_are_refused_by_flag(field: str, value: int) -> None:
    flag = field.replace("_", "-")
    with pytest.raises(ValueError, match=f"--{flag} must be >= "):
        EvalConfig(**{field: value})


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan")])
def test_a_knn_temperature_no_vote_can_use_is_refused_before_the_features(t: float) -> None:
    """It failed in the kNN vote, after every feature was extracted (minutes on a folder)."""
    with pytest.raises(ValueError, match="--t must be a number > 0"):
        EvalConfig(T=t)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="ROOT/CLASS/IMAGE"):
        image_folder(tmp_path / "flat")


def test_retrieval_metrics_by_hand() -> None:
    gallery = np.array([0, 0, 1, 1, 2])
    queries = np.array([0, 1, 3])  # class 3 has nothing relevant: left out
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.2, 0.0],  # ranking 0(rel) 2 3 1(rel) 4
            [0.9, 0.8, 0.1, 0.2, 0.0],  # ranking 0 1 3(rel) 2(rel) 4
            [0.5, 0.4, 0.3, 0.2, 0.1],
        ]
    )
    m = retrieval_metrics(sim, queries, gallery, ks=(1, 2, 3))
    assert m["queries"] == 2
    assert m["recall@1"] == 50.0 and m["recall@2"] == 50.0 and m["recall@3"] == 100.0
    # AP@3 = sum P@i rel_i / min(3, R): q0: (1/1)/2 = 0.5; q1: (1/3)/2 = 1/6
    assert m["mAP@3"] == pytest.approx(100 * (0.5 + 1 / 6) / 2)


def test_outcomes_are_the_metrics_query_by_query(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", per_class=4, seed=0)
    make_tree(tmp_path / "val", per_class=2, seed=1)
    mislabelled = tmp_path / "val" / "class1" / "red.png"  # a class0 (red) image filed as class1
    mislabelled.write_bytes((tmp_path / "train" / "class0" / "0.png").read_bytes())
    r = evaluate("pixels", tmp_path / "train", tmp_path / "val", FAST, outcomes=True)
    out = r["outcomes"]
    assert len(out["val"]) == r["n_val"] == 7
    wrong = [Path(p).name for p, ok in zip(out["val"], out["recall@1"], strict=True) if not ok]
    assert wrong == ["red.png"]  # the only query whose nearest image is of another class
    for key, metric in (("knn", "knn_top1"), ("probe", "probe_top1"), ("recall@1", "recall@1")):
        assert len(out[key]) == r["n_val"] and sum(out[key]) == 6, key
        assert 100.0 * sum(out[key]) / len(out[key]) == pytest.approx(r[metric]), key
    assert "outcomes" not in evaluate("pixels", tmp_path / "train", tmp_path / "val", FAST)
