"""Export round trip, official-checkpoint import, and refusal of unsafe or mismatched files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import launch
from moco.encoders import build_encoder
from moco.export import (
    CheckpointError,
    EncoderConfig,
    export_encoder,
    load_checkpoint_file,
    load_encoder,
    save_encoder,
)
from moco.model import MoCo, ModelConfig
from moco.train import _init_from

torch.set_num_threads(1)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def our_checkpoint(path: Path, small_stem: bool = True) -> MoCo:
    torch.manual_seed(0)
    model = MoCo(ModelConfig(arch="resnet18", small_stem=small_stem, K=8, bn_splits=2))
    model.encoder_q(torch.randn(4, 3, 16, 16))  # move BN running stats away from the defaults
    cfg = {"image_size": 32, "model": {"arch": "resnet18", "small_stem": small_stem}}
    torch.save({"model": model.state_dict(), "epoch": 3, "config": cfg}, path)
    return model


def test_export_embeds_at_the_runs_embed_size_unless_told(tmp_path: Path) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["config"]["embed_size"] = 48
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert export_encoder(tmp_path / "ckpt.pt", tmp_path / "a").image_size == 48
    assert export_encoder(tmp_path / "ckpt.pt", tmp_path / "b", image_size=32).image_size == 32
    for size in (0, 100_000):  # 0 was the default, 100,000 ran out of memory
        with pytest.raises(ValueError, match=f"--image-size must be from 8 to 2048 .*got {size}"):
            export_encoder(tmp_path / "ckpt.pt", tmp_path / "c", image_size=size)
    assert not (tmp_path / "c").exists()


def test_export_keeps_a_long_runs_log_thinned_with_its_monitored_epochs(tmp_path: Path) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    rows = [
        {"epoch": e, "loss": 5.0 / e} | ({"knn_top1": e / 30} if e % 10 == 0 else {})
        for e in range(1, 2001)
    ]  # a long --minutes run on few images: 2,000 epochs
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    export_encoder(tmp_path / "ckpt.pt", tmp_path / "enc")
    log = json.loads((tmp_path / "enc" / "config.json").read_text())["training"]["log"]
    epochs = [r["epoch"] for r in log]
    assert 150 <= len(log) <= 200 and epochs == sorted(set(epochs)) and epochs[0] == 1
    assert epochs[-1] == 2000 and log[-1] == rows[-1]  # the last epoch, whole
    assert sum("knn_top1" in r for r in log) >= 100  # the monitor's curve survives
    assert max(b - a for a, b in itertools.pairwise(epochs)) <= 25  # no long gap


def test_export_round_trip_equals_the_query_encoder(tmp_path: Path) -> None:
    model = our_checkpoint(tmp_path / "ckpt.pt")
    cfg = export_encoder(tmp_path / "ckpt.pt", tmp_path / "enc")
    enc, loaded_cfg = load_encoder(tmp_path / "enc")
    assert loaded_cfg == cfg and cfg.arch == "resnet18" and cfg.small_stem
    assert cfg.feature_dim == 512 and cfg.image_size == 32 and len(cfg.content_hash) == 64
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    backbone = model.encoder_q
    backbone.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(features(enc, x), features(backbone, x), atol=1e-5)
    saved = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert saved["content_hash"] == cfg.content_hash and saved["source"] == "moco-search"


def official_checkpoint(path: Path, prefix: str, arch: str = "resnet18") -> nn.Module:
    """A checkpoint with the key layout of facebookresearch/moco (or moco-v3)."""
    torch.manual_seed(1)
    net = build_encoder(arch, num_classes=128)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    state = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v.clone() for k, v in net.state_dict().items()}
    state["module.queue"] = torch.randn(128, 16)
    torch.save({"epoch": 800, "arch": arch, "state_dict": state, "optimizer": {}}, path)
    return net


@pytest.mark.parametrize("prefix", ["module.encoder_q.", "module.base_encoder."])
def test_official_checkpoint_import(tmp_path: Path, prefix: str) -> None:
    net = official_checkpoint(tmp_path / "moco_v2_800ep_pretrain.pth.tar", prefix)
    cfg = export_encoder(tmp_path / "moco_v2_800ep_pretrain.pth.tar", tmp_path / "enc")
    assert cfg.arch == "resnet18" and not cfg.small_stem and cfg.image_size == 224
    assert cfg.source.startswith("facebookresearch/moco") and cfg.crop_pct == 0.875
    enc, _ = load_encoder(tmp_path / "enc")
    net.fc = nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(features(enc, x), features(net, x), atol=1e-5)


def test_init_from_official_checkpoint(tmp_path: Path) -> None:
    net = official_checkpoint(tmp_path / "ckpt.pth.tar", "module.encoder_q.")
    model = MoCo(ModelConfig(arch="resnet18", K=8))
    _init_from(model, str(tmp_path / "ckpt.pth.tar"))
    for enc in (model.encoder_q, model.encoder_k):
        assert torch.equal(enc.conv1.weight, net.conv1.weight)
        assert torch.equal(enc.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    with pytest.raises(CheckpointError, match=r"holds resnet18 .* builds resnet34"):
        _init_from(MoCo(ModelConfig(arch="resnet34", K=8)), str(tmp_path / "ckpt.pth.tar"))


class Payload:
    """Anything that is not a tensor or primitive: loading it would run arbitrary code."""


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint_file(tmp_path / "evil.pt")


def test_not_a_moco_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="No MoCo query encoder"):
        export_encoder(tmp_path / "x.pt", tmp_path / "enc")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"Unreadable checkpoint .* not a PyTorch checkpoint"):
        load_checkpoint_file(tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"damaged one \(torch.load said EOFError\)$"):
        load_checkpoint_file(tmp_path / "empty.pt")
    # An encoder's weights file names its encoder, as its directory does.
    enc = save_encoder(build_encoder("resnet18"), EncoderConfig(arch="resnet18"), tmp_path / "e")
    again = export_encoder(tmp_path / "e" / "model.safetensors", tmp_path / "e2")
    assert again.content_hash == enc.content_hash


def test_changed_weights_are_detected(tmp_path: Path) -> None:
    cfg = save_encoder(build_encoder("resnet18"), EncoderConfig(arch="resnet18"), tmp_path / "e")
    assert load_encoder(tmp_path / "e")[1].content_hash == cfg.content_hash
    weights = tmp_path / "e" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the hash"):
        load_encoder(tmp_path / "e")


def test_half_precision_export_loads_as_float32(tmp_path: Path) -> None:
    net = build_encoder("resnet18")
    full = save_encoder(net, EncoderConfig(arch="resnet18"), tmp_path / "full")
    half = save_encoder(net, EncoderConfig(arch="resnet18"), tmp_path / "half", half=True)
    assert full.content_hash != half.content_hash
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "full")
    enc, _ = load_encoder(tmp_path / "half")
    assert enc.conv1.weight.dtype == torch.float32
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(features(enc, x), features(net, x), rtol=1e-2, atol=1e-2)


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    our_checkpoint(tmp_path / "ckpt.pt")
    assert launch.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "e")]) == 0
    assert "sha256" in capsys.readouterr().out
    assert launch.main(["export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "e")]) == 2
    assert "Checkpoint not found" in capsys.readouterr().err
    assert launch.main(["export", str(tmp_path / "e"), "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()  # an encoder's folder is replaced; a run's or one of photos is not
    run, photos = tmp_path / "run", tmp_path / "photos"
    for folder, names in ((run, ("config.json", "log.jsonl")), (photos, ("a.jpg", "b.png"))):
        folder.mkdir()
        for name in names:
            (folder / name).write_text("{}")
    for out, said in (
        (run, f"--out {run} is a pretraining run: export into a folder of its own, such as "),
        (photos, f"--out {photos} holds other files (a.jpg, ...): export into a new or empty"),
    ):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert launch.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(out)]) == 2
        assert said in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_cli_export_on_a_full_disk_is_one_line_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The kernel's ENOSPC, from /dev/full behind the weights' temporary file (safetensors
    writing by path reported a full disk as a ``SafetensorError``: a traceback)."""
    our_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "e"
    out.mkdir()
    (out / "model.safetensors.tmp").symlink_to("/dev/full")
    assert launch.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"moco-search export: error: Disk full while writing {out / 'model.safetensors'}: "
        "nothing was lost (files are written whole or not at all); free some space and re-run"
    ]
    assert list(out.iterdir()) == []  # no weights, no config, no temporary file
    assert launch.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(out)]) == 0
    assert load_encoder(out)[1].content_hash


def test_config_that_is_not_an_object_is_a_checkpoint_error(tmp_path: Path) -> None:
    save_encoder(build_encoder("resnet18"), EncoderConfig(arch="resnet18"), tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text("[1, 2]\n")
    with pytest.raises(
        CheckpointError, match="JSON object with 'arch' expected, found a JSON list"
    ):
        load_encoder(tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text('{"image_size": 32}')
    with pytest.raises(CheckpointError, match="Unreadable encoder config"):
        load_encoder(tmp_path / "e")


def test_truncated_weights_without_a_hash_are_a_checkpoint_error(tmp_path: Path) -> None:
    """With no hash to compare, the truncation is found by safetensors itself."""
    save_encoder(build_encoder("resnet18"), EncoderConfig(arch="resnet18"), tmp_path / "e")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / "config.json").write_text(json.dumps({**config, "content_hash": ""}))
    weights = tmp_path / "e" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"Unreadable encoder weights .*truncated"):
        load_encoder(tmp_path / "e")


def test_weights_of_another_arch_are_a_checkpoint_error(tmp_path: Path) -> None:
    save_encoder(build_encoder("resnet18"), EncoderConfig(arch="resnet18"), tmp_path / "e")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / "config.json").write_text(json.dumps({**config, "small_stem": True}))
    with pytest.raises(CheckpointError, match="do not fit its config"):
        load_encoder(tmp_path / "e", verify=False)
