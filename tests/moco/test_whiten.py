"""The map ``export`` fits on the user's images: centring, whitening, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import launch
from indexes.manifest import encoder_changes
from moco import whiten
from moco.data import list_images, load_image
from moco.encoders import with_pooling
from moco.export import export_encoder, load_encoder
from moco.preprocess import eval_transform
from tests.moco.test_export import our_checkpoint


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # a few strong directions
    return torch.randn(n, d, generator=g) @ mix.T + 3.0  # and a large shared offset


def test_center_subtracts_the_mean_of_the_normalised_features() -> None:
    x = correlated(500, 6)
    t = whiten.fit_map(x, "center")
    assert set(t) == {"mean"}
    torch.testing.assert_close(t["mean"], F.normalize(x, dim=1).mean(0), atol=1e-6, rtol=0)
    out = whiten.wrap(nn.Identity(), t)(x)
    torch.testing.assert_close(out, F.normalize(F.normalize(x, dim=1) - t["mean"], dim=1))
    # the shared offset is gone: the mean cosine of the fitted features falls from ~1 to ~0
    raw = F.normalize(x, dim=1)
    assert (raw @ raw.T).mean() > 0.9 and (out @ out.T).mean().abs() < 0.05


def test_whitening_without_shrinkage_gives_unit_covariance(monkeypatch) -> None:
    monkeypatch.setattr(whiten, "SHRINK", 0.0)
    x = correlated(4000, 8)
    t = whiten.fit_map(x, "whiten")
    y = (F.normalize(x, dim=1) - t["mean"]) @ t["matrix"]
    torch.testing.assert_close(y.T @ y / len(y), torch.eye(8), atol=1e-3, rtol=0)


def test_shrinkage_keeps_weak_directions_from_being_blown_up() -> None:
    x = correlated(4000, 8)
    t = whiten.fit_map(x, "whiten")
    y = (F.normalize(x, dim=1) - t["mean"]) @ t["matrix"]
    var = torch.linalg.eigvalsh(y.T @ y / len(y))
    # each direction's variance is e / (e + SHRINK * mean(e)): below 1, the weakest far below
    assert (var < 1).all() and var[0] < 0.1


def test_whitening_keeps_the_original_axes(monkeypatch) -> None:
    """ZCA: a symmetric matrix, so a probe that standardises each dimension sees the features'
    own axes (in the principal axes it would whiten them fully and overfit)."""
    x = correlated(2000, 8)
    t = whiten.fit_map(x, "whiten")
    torch.testing.assert_close(t["matrix"], t["matrix"].T)
    monkeypatch.setattr(whiten, "SHRINK", 1e6)  # all shrinkage: centring up to a scale
    m = whiten.fit_map(x, "whiten")["matrix"]
    torch.testing.assert_close(m / m[0, 0], torch.eye(8), atol=1e-4, rtol=0)


def test_auto_whitens_with_enough_images_and_centres_without() -> None:
    assert whiten.kind(whiten.fit_map(correlated(16, 8), "auto")) == "whiten"
    assert whiten.kind(whiten.fit_map(correlated(15, 8), "auto")) == "center"
    assert whiten.kind(whiten.fit_map(correlated(15, 8), "none")) == "none"
    assert whiten.resolve("auto", 1792, 896) == "whiten"
    assert whiten.resolve("auto", 1791, 896) == "center"


def test_whitening_refuses_fewer_images_than_it_needs() -> None:
    with pytest.raises(ValueError, match=r"needs at least 16 images .* got 10"):
        whiten.fit_map(correlated(10, 8), "whiten")
    assert set(whiten.fit_map(correlated(10, 8), "center")) == {"mean"}
    with pytest.raises(ValueError, match="Unknown fit 'pca'"):
        whiten.fit_map(correlated(10, 8), "pca")


def test_export_fits_on_the_folder_and_the_encoder_applies_it(
    tmp_path: Path, emoji_dir: Path
) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    plain = export_encoder(tmp_path / "ckpt.pt", tmp_path / "plain", pooling="stages")
    cfg = export_encoder(
        tmp_path / "ckpt.pt", tmp_path / "enc", pooling="stages", fit="center", fit_on=emoji_dir
    )
    assert cfg.pooling == "stages" and cfg.feature_dim == 896 == plain.feature_dim
    assert cfg.fit == {"kind": "center", "images": 32, "folder": str(emoji_dir.resolve())}
    assert cfg.content_hash != plain.content_hash  # the map is part of the encoder's identity
    enc, loaded = load_encoder(tmp_path / "enc")
    base, _ = load_encoder(tmp_path / "plain")
    assert loaded == cfg
    x = torch.stack([eval_transform(cfg)(load_image(p)) for p in list_images(emoji_dir)])
    with torch.no_grad():
        raw = F.normalize(base(x), dim=1)
        got = enc(x)
    assert got.shape == (32, 896)
    torch.testing.assert_close(got, F.normalize(raw - raw.mean(0), dim=1), atol=1e-5, rtol=0)


def test_pooling_and_fit_count_as_a_different_encoder(tmp_path: Path) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    avg = export_encoder(tmp_path / "ckpt.pt", tmp_path / "a")
    gem = export_encoder(tmp_path / "ckpt.pt", tmp_path / "g", pooling="gem")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    manifest = {"encoder": {"content_hash": avg.content_hash, "config": saved}}
    assert encoder_changes(manifest, gem) == ["pooling avg -> gem"]
    model, _ = load_encoder(tmp_path / "g")
    reference = with_pooling(load_encoder(tmp_path / "a")[0], "gem")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert avg.content_hash == gem.content_hash  # same weights: only the config tells them apart


def test_cli_export_centres_on_the_training_folder_when_it_is_there(
    tmp_path: Path, emoji_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["config"]["data"] = str(emoji_dir)
    torch.save(ckpt, tmp_path / "here.pt")
    ckpt["config"]["data"] = str(tmp_path / "moved away")
    torch.save(ckpt, tmp_path / "gone.pt")

    assert launch.main(["export", str(tmp_path / "here.pt"), "--out", str(tmp_path / "a")]) == 0
    assert f"centred on 32 files of {emoji_dir.resolve()}" in capsys.readouterr().out
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written["fit"]["kind"] == "center"  # 32 images: too few to whiten 896-d features
    assert written["pooling"] == "stages" and written["feature_dim"] == 896  # ResNet-18's default

    assert launch.main(["export", str(tmp_path / "gone.pt"), "--out", str(tmp_path / "b")]) == 0
    assert "not centred (no training folder here" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["fit"] == {}

    code = launch.main(
        ["export", str(tmp_path / "gone.pt"), "--out", str(tmp_path / "c"), "--fit", "whiten"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "needs a folder of images to fit on" in err and "Traceback" not in err
    code = launch.main(
        ["export", str(tmp_path / "here.pt"), "--out", str(tmp_path / "d"), "--fit", "whiten"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "needs at least 1792 images" in err and "got 32" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_an_encoder_exports_again_with_another_map_in_place(
    tmp_path: Path, emoji_dir: Path
) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    plain = export_encoder(tmp_path / "ckpt.pt", tmp_path / "plain")
    want = export_encoder(tmp_path / "ckpt.pt", tmp_path / "want", fit="center", fit_on=emoji_dir)
    export_encoder(tmp_path / "ckpt.pt", tmp_path / "enc", pooling="stages")
    got = export_encoder(tmp_path / "enc", tmp_path / "enc", fit="center", fit_on=emoji_dir)
    assert got.content_hash == want.content_hash and got.pooling == "avg"
    assert got.training == want.training and got.image_size == want.image_size
    back = export_encoder(tmp_path / "enc", tmp_path / "back")  # and the map comes off again
    assert back.content_hash == plain.content_hash and back.fit == {}


def test_export_says_why_it_cannot_fit(tmp_path: Path, emoji_dir: Path) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    cases = [
        (tmp_path / "empty", 5000, "0 readable images in"),
        (tmp_path / "nowhere", 5000, "Image folder not found"),
        (emoji_dir, 0, "--fit-images must be at least 2"),
    ]
    for folder, n, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            export_encoder(
                tmp_path / "ckpt.pt", tmp_path / "e", fit="center", fit_on=folder, fit_images=n
            )
    assert not (tmp_path / "e").exists()
    cfg = export_encoder(
        tmp_path / "ckpt.pt", tmp_path / "e", fit="center", fit_on=emoji_dir, fit_images=5
    )
    assert cfg.fit["images"] == 5
