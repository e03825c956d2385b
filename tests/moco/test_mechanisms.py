"""The three mechanisms of the MoCo paper: end-to-end, memory bank, and MoCo with m = 0."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moco.checkpoint import LAST
from moco.export import export_encoder, load_checkpoint_file
from moco.loss import batch_logits
from moco.mechanisms import EndToEnd, MemoryBank, build_model
from moco.model import MoCo, ModelConfig
from moco.train import train
from tests.moco.test_train import read_log, tiny_cfg

torch.set_num_threads(1)


def config(**kw: object) -> ModelConfig:
    base = dict(arch="resnet18", small_stem=True, dim=8, K=10, bn_splits=1, T=0.2)
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_end_to_end_gradients_reach_both_views() -> None:
    torch.manual_seed(0)
    model = EndToEnd(config(mechanism="end-to-end", bn_splits=2))
    im_q = torch.randn(4, 3, 16, 16, requires_grad=True)
    im_k = torch.randn(4, 3, 16, 16, requires_grad=True)
    loss, logits, labels = model(im_q, im_k)
    loss.backward()
    assert logits.shape == (4, 4) and labels.eq(0).all()  # own key + the batch's 3 others
    assert im_q.grad is not None and im_q.grad.abs().sum() > 0
    assert im_k.grad is not None and im_k.grad.abs().sum() > 0  # keys are trained, not momentum


def test_end_to_end_logits_equal_a_naive_loop_over_the_batch() -> None:
    torch.manual_seed(0)
    model = EndToEnd(config(mechanism="end-to-end"))  # no split: keys do not depend on shuffle
    im_q, im_k = torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16)
    _, logits, _ = model(im_q, im_k)
    with torch.no_grad():
        q = F.normalize(model.encoder_q(im_q), dim=1)
        k = F.normalize(model.encoder_q(im_k), dim=1)
    for i in range(5):
        row = [q[i] @ k[i]] + [q[i] @ k[j] for j in range(5) if j != i]
        assert torch.allclose(logits[i], torch.stack(row) / 0.2, atol=1e-4), i


def test_batch_logits_over_ranks_and_with_a_repeated_image() -> None:
    """The DDP layout (this rank's queries at an offset among all keys) and own-image masking."""
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    ids, k_ids = torch.tensor([7, 8]), torch.tensor([1, 2, 7, 8, 8, 3])
    logits, _ = batch_logits(q, k, 1.0, offset=2, ids=ids, k_ids=k_ids)
    assert logits.shape == (2, 6)
    assert torch.allclose(logits[:, 0], (q * k[2:4]).sum(1))
    # query 1 (image 8): its positive is key 3; key 4 is the same image, so not a negative
    assert torch.isinf(logits[1]).sum() == 1 and logits[1, 4] == float("-inf")
    assert torch.isfinite(logits[0]).all()


def test_memory_bank_never_uses_a_querys_own_image_as_a_negative() -> None:
    torch.manual_seed(0)
    model = MemoryBank(config(mechanism="memory-bank", bank_size=6, K=50))
    ids, x = torch.tensor([0, 3, 5]), torch.randn(3, 3, 16, 16)
    for seed in range(5):
        torch.manual_seed(seed)
        idx, same = model.sample(ids)
        assert (idx == ids[:, None]).eq(same).all()  # every draw of an own image is excluded
        torch.manual_seed(seed)
        _, logits, _ = model(x, x, ids)
        torch.manual_seed(seed)
        idx, same = model.sample(ids)  # the same draw as forward's (it is its first random)
        assert same.any()  # 50 draws of 6: each query drew its own image
        assert torch.isinf(logits[:, 1:]).eq(same).all()  # ... and only those are left out


def test_memory_bank_update_equals_the_formula_and_touches_only_the_batch() -> None:
    torch.manual_seed(0)
    model = MemoryBank(config(mechanism="memory-bank", bank_size=6, K=4, bank_t=0.25))
    before = model.bank.clone()
    q = F.normalize(torch.randn(2, 8), dim=1)
    model.update(q, torch.tensor([1, 4]))
    expect = F.normalize(0.25 * before[:, [1, 4]] + 0.75 * q.T, dim=0)
    assert torch.allclose(model.bank[:, [1, 4]], expect)
    assert torch.equal(model.bank[:, [0, 2, 3, 5]], before[:, [0, 2, 3, 5]])
    # a training step moves exactly the entries of its batch
    before = model.bank.clone()
    model(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([0, 5]))
    moved = (model.bank != before).any(0)
    assert moved.tolist() == [True, False, False, False, False, True]


def test_memory_bank_resume_equals_an_uninterrupted_run(emoji_dir: Path, tmp_path: Path) -> None:
    """The bank is in the checkpoint; continuing from epoch 1 ends where an unbroken run does."""
    kw = dict(mechanism="memory-bank", save_every=1)
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_cfg(emoji_dir, full, **kw))
    part.mkdir()
    shutil.copy(full / "checkpoint_0001.pt", part / LAST)
    train(tiny_cfg(emoji_dir, part, resume=True, **kw))
    a = load_checkpoint_file(full / LAST)["model"]
    b = load_checkpoint_file(part / LAST)["model"]
    one = load_checkpoint_file(full / "checkpoint_0001.pt")["model"]
    assert a["bank"].shape[1] == len(list(emoji_dir.rglob("*.webp")))  # one per image
    assert not torch.equal(a["bank"], one["bank"])  # the second epoch moved the bank
    assert a.keys() == b.keys() and "queue" not in a and not any("encoder_k" in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_momentum_zero_makes_the_key_encoder_the_query_encoder(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = MoCo(config(m=0.0))
    for step in range(2):
        with torch.no_grad():
            for p in model.encoder_q.parameters():
                p.add_(torch.randn_like(p))  # as an optimizer step would
        model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
        for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
            assert torch.equal(pq, pk), step
    with caplog.at_level(logging.WARNING):  # allowed, with the paper's warning
        train(tiny_cfg(emoji_dir, tmp_path / "run", moco_m=0.0, epochs=1, m_schedule="constant"))
    assert "fails to converge" in caplog.text
    assert read_log(tmp_path / "run")[0]["momentum"] == 0.0


@pytest.mark.parametrize("mechanism", ["end-to-end", "memory-bank"])
def test_each_mechanism_trains_and_exports(mechanism: str, emoji_dir: Path, tmp_path: Path) -> None:
    ckpt = train(tiny_cfg(emoji_dir, tmp_path / "run", mechanism=mechanism, epochs=1))
    row = read_log(tmp_path / "run")[0]
    assert row["loss"] > 0 and row["steps"] == 4 and "momentum" not in row
    assert "view_recall" in row  # the label-free monitor works on every mechanism
    cfg = export_encoder(ckpt, tmp_path / "enc")
    assert cfg.feature_dim == 512


@pytest.mark.parametrize("mechanism", ["moco", "end-to-end"])
def test_a_tiny_folders_batch_splits_its_batchnorm_into_groups_of_four(
    mechanism: str, emoji_dir: Path, tmp_path: Path
) -> None:
    """32 images choose batch 8: 8 groups of one image erased every key at layer4's 1x1 map
    (end-to-end, with gradients through the split, stopped with a PyTorch error)."""
    run = tmp_path / "run"
    train(tiny_cfg(emoji_dir, run, mechanism=mechanism, batch_size=None, bn_splits=None, epochs=1))
    saved = json.loads((run / "config.json").read_text())
    assert (saved["batch_size"], saved["bn_splits"]) == (8, 2)
    assert read_log(run)[0]["loss"] > 0


def test_an_unknown_mechanism_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="end-to-end, memory-bank"):
        build_model(config(mechanism="bank"))
