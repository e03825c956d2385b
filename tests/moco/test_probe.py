"""Linear probe: learns what is learnable, nothing more; paper preset; save/load; metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.encoders import build_encoder
from moco.metrics import (
    classification_metrics,
    save_confusion_png,
    stratified_split,
    wilson_interval,
)
from moco.probe import (
    LinearProbe,
    ProbeConfig,
    ProbeMismatchError,
    load_probe,
    read_probe_meta,
    save_probe,
    train_probe,
)
from moco.probe_images import (
    assert_backbone_unchanged,
    backbone_state,
    paper_train_transform,
    train_probe_on_images,
)


def clusters(
    n: int = 300, c: int = 4, d: int = 32, seed: int = 0, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable classes: well separated Gaussian clusters."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = rng.normal(size=(c, d)) * 3
    return ((centres[y] + rng.normal(size=(n, d)) * 0.3) * scale).astype(np.float32), y


def accuracy(probe: LinearProbe, x: np.ndarray, y: np.ndarray) -> float:
    top, _ = probe.predict(x, k=1)
    return float((top[:, 0] == y).mean())


@pytest.mark.parametrize(
    "cfg",
    [ProbeConfig.fast(), dataclasses.replace(ProbeConfig.paper(), epochs=5)],
    ids=["fast", "paper-hparams"],
)
def test_separable_features_reach_100(cfg: ProbeConfig) -> None:
    # Small-scale features (like unnormalised MoCo ones): the fast preset normalises, the paper's
    # lr=30 compensates.
    x, y = clusters(scale=0.05)
    tr, va = stratified_split(y, 0.3)
    probe = train_probe(x[tr], y[tr], cfg)
    assert accuracy(probe, x[va], y[va]) >= 0.99


def test_shuffled_labels_stay_near_chance() -> None:
    x, _ = clusters(n=400, c=4)
    y = np.random.default_rng(1).integers(0, 4, len(x))  # labels unrelated to the features
    tr, va = stratified_split(y, 0.5)
    probe = train_probe(x[tr], y[tr])
    assert accuracy(probe, x[tr], y[tr]) > 0.4  # it does fit the training set somewhat ...
    assert accuracy(probe, x[va], y[va]) < 0.4  # ... but cannot generalise: chance is 0.25


def test_few_labels_per_class() -> None:
    x, y = clusters(n=400, c=4)
    idx = np.concatenate([np.flatnonzero(y == c)[:1] for c in range(4)])  # 1 label per class
    probe = train_probe(x[idx], [f"class{c}" for c in y[idx]])
    assert probe.classes == ["class0", "class1", "class2", "class3"]
    assert accuracy(probe, x, y) > 0.9
    top, probs = probe.predict(x[:3], k=5)
    assert top.shape == probs.shape == (3, 4)  # k clipped to the number of classes
    assert np.all(np.diff(probs, axis=1) <= 0) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_save_load_identical_and_refused_for_another_encoder(tmp_path: Path) -> None:
    x, y = clusters()
    probe = train_probe(x, [str(v) for v in y], encoder_hash="a" * 64)
    save_probe(probe, tmp_path / "p", cfg=ProbeConfig.fast(), metrics={"top1": 99.0})
    again = load_probe(tmp_path / "p", encoder_hash="a" * 64)
    for a, b in zip(probe.predict(x), again.predict(x), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.classes == probe.classes and again.normalize == "l2+standardize"
    assert read_probe_meta(tmp_path / "p")["metrics"] == {"top1": 99.0}
    with pytest.raises(ProbeMismatchError, match="not of"):
        load_probe(tmp_path / "p", encoder_hash="b" * 64)
    with pytest.raises(FileNotFoundError):
        load_probe(tmp_path / "nothing")


def test_paper_preset_is_the_papers() -> None:
    cfg = ProbeConfig.paper()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs) == (
        "sgd",
        30.0,
        0.9,
        0.0,
        100,
    )
    assert (cfg.milestones, cfg.gamma, cfg.batch_size, cfg.normalize) == (
        (60, 80),
        0.1,
        256,
        "none",
    )
    assert ProbeConfig.preset("paper") == cfg and ProbeConfig.preset("fast") == ProbeConfig()
    with pytest.raises(ValueError, match="valid"):
        ProbeConfig(optimizer="adamw")


def test_paper_schedule_decays_at_60_and_80(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    real = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *a: object, **kw: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    x, y = clusters(n=8, d=4)
    train_probe(x, y, dataclasses.replace(ProbeConfig.paper(), batch_size=8))  # 1 step/epoch
    assert len(seen) == 100
    assert seen[59] == 30.0 and seen[60] == pytest.approx(3.0) and seen[80] == pytest.approx(0.3)


def write_images(root: Path, per_class: int = 3, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")


def test_paper_protocol_leaves_backbone_unchanged(tmp_path: Path) -> None:
    from moco.export import EncoderConfig

    write_images(tmp_path)
    paths = sorted(tmp_path.rglob("*.png"))
    labels = [p.parent.name for p in paths]
    backbone = build_encoder("resnet18", small_stem=True).train()  # wrongly in train mode
    before = backbone_state(backbone)
    pre = EncoderConfig(arch="resnet18", small_stem=True, image_size=32, crop_pct=1.0)
    cfg = dataclasses.replace(ProbeConfig.paper(), epochs=2, batch_size=4)
    probe = train_probe_on_images(
        backbone, paths, labels, paper_train_transform(pre), cfg, encoder_hash="h"
    )
    assert_backbone_unchanged(before, backbone_state(backbone))  # BatchNorm stats included
    assert probe.classes == ["c0", "c1"] and probe.fc.weight.abs().max() > 0.05  # fc did learn
    backbone.train()(torch.randn(4, 3, 32, 32))  # what train-mode BatchNorm would have done
    with pytest.raises(AssertionError, match="changed"):
        assert_backbone_unchanged(before, backbone_state(backbone))


def test_stratified_split() -> None:
    labels = np.array(["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["d"])
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([tr, va])) == list(range(len(labels)))
    assert [int((labels[va] == c).sum()) for c in "abcd"] == [2, 1, 1, 0]
    assert set(labels[tr]) == set("abcd")  # every class keeps a training image
    np.testing.assert_array_equal(stratified_split(labels, 0.2, seed=3)[1], va)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(3, 4)
    assert lo == pytest.approx(0.3006, abs=1e-3) and hi == pytest.approx(0.9544, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_classification_metrics_and_png(tmp_path: Path) -> None:
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([0, 1, 1, 0])
    m = classification_metrics(scores, labels, ["x", "y", "z"])
    assert m.n == 4 and m.top1 == 50.0 and m.top5 == 100.0
    assert m.confusion == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert m.per_class == {"x": {"accuracy": 50.0, "n": 2}, "y": {"accuracy": 50.0, "n": 2}}
    assert m.top1_ci[0] < 50.0 < m.top1_ci[1] and "4 held-out" in m.summary()
    png = save_confusion_png(m.confusion, m.classes, tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
