"""Published checkpoints by name: fetched once, checked against the md5, converted (no network:
the URL points at a file built in the test with the official key layout)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from moco import published
from moco.export import CheckpointError, load_encoder
from tests.moco.test_export import official_checkpoint


def test_fetch_checks_md5_converts_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    official_checkpoint(ckpt, "module.encoder_q.")
    md5 = hashlib.md5(ckpt.read_bytes()).hexdigest()
    monkeypatch.setitem(published.PUBLISHED, "tiny", (ckpt.as_uri(), md5[:8]))
    monkeypatch.setenv("MOCO_SEARCH_CACHE", str(tmp_path / "cache"))
    encoder = published.resolve_encoder("tiny")
    _, cfg = load_encoder(encoder)
    assert cfg.arch == "resnet18" and cfg.source == "facebookresearch/moco"
    ckpt.unlink()  # a second call uses the cache, not the network
    assert published.resolve_encoder("tiny") == encoder


def test_wrong_md5_is_refused_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "x.pth.tar"
    official_checkpoint(ckpt, "module.encoder_q.")
    monkeypatch.setitem(published.PUBLISHED, "bad", (ckpt.as_uri(), "00000000"))
    with pytest.raises(CheckpointError, match="does not match md5"):
        published.fetch_published("bad", cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.pth.tar"))


def test_paths_pass_through_and_unknown_names_list_valid_ones(tmp_path: Path) -> None:
    assert published.resolve_encoder(tmp_path) == tmp_path
    assert published.resolve_encoder("no/such/dir") == Path("no/such/dir")
    with pytest.raises(ValueError, match="moco_v2_800ep"):
        published.fetch_published("moco_v9")
