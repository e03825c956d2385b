"""MoCo's invariants: FIFO queue, momentum formula, no gradient into the key encoder, shuffle-BN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco.batchnorm import SplitBatchNorm
from moco.model import MoCo, ModelConfig
from tests.moco.conftest import fresh_compile_stderr

torch.set_num_threads(1)


def tiny(**kw: object) -> MoCo:
    torch.manual_seed(0)
    cfg = dict(arch="resnet18", small_stem=True, dim=4, K=10, bn_splits=1)
    return MoCo(ModelConfig(**{**cfg, **kw}))


def test_queue_is_fifo_and_wraps_when_k_is_not_a_multiple_of_the_batch() -> None:
    model = tiny()
    batches = [torch.full((4, 4), float(i)) for i in (1, 2, 3)]
    for b in batches:
        model.enqueue(b)
    # 12 keys into K=10: batch 3 wrapped into columns 8, 9, 0, 1; batch 1 kept in 2, 3.
    assert int(model.queue_ptr) == 2
    assert model.queue[0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]


def test_enqueue_more_keys_than_k_keeps_the_newest() -> None:
    model = tiny()
    keys = torch.arange(13, dtype=torch.float32)[:, None].repeat(1, 4)
    model.enqueue(keys)
    assert sorted(model.queue[0].tolist()) == list(range(3, 13))


def test_momentum_update_equals_the_formula() -> None:
    model = tiny(m=0.5)
    for p in model.encoder_q.parameters():
        p.data.fill_(1.0)
    for p in model.encoder_k.parameters():
        p.data.fill_(3.0)
    model.momentum_update()
    for p in model.encoder_k.parameters():  # 0.5 * 3 + 0.5 * 1
        assert torch.allclose(p, torch.full_like(p, 2.0))


def test_only_the_query_encoder_gets_gradients_and_the_queue_moves() -> None:
    model = tiny(K=16)
    x = torch.randn(4, 3, 16, 16)
    queue_before = model.queue.clone()
    k_before = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    loss, logits, labels = model(x, x.flip(-1))
    loss.backward()
    assert logits.shape == (4, 17) and labels.eq(0).all()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert int(model.queue_ptr) == 4
    assert not torch.equal(model.queue[:, :4], queue_before[:, :4])
    assert torch.equal(model.queue[:, 4:], queue_before[:, 4:])
    # The key encoder moved only by momentum: it still equals the query encoder it was copied
    # from, since theta_q did not change before this step.
    for n, p in model.encoder_k.named_parameters():
        assert torch.allclose(p, k_before[n])


def test_shuffled_keys_are_unshuffled() -> None:
    """With one BatchNorm group the shuffle must not change any key (permutation undone)."""
    model = tiny()
    x = torch.randn(8, 3, 16, 16)
    keys = model._keys(x)
    expected = F.normalize(model.encoder_k(x), dim=1)
    assert torch.allclose(keys, expected, atol=1e-5)


def test_split_batchnorm_normalises_each_group_on_its_own() -> None:
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.randn(8, 3, 5, 5)
    x[4:] += 10.0  # the second half has another mean: one BN over all would not centre it
    out = bn(x)
    for half in (out[:4], out[4:]):
        assert half.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    plain = nn.BatchNorm2d(3)
    assert set(bn.state_dict()) == set(plain.state_dict())
    bn.eval()
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    assert torch.allclose(bn(x), plain(x))


def test_split_batchnorm_without_grad_equals_with_grad() -> None:
    """The key encoder's no-grad path (one fused pass) matches the per-group path."""
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    a, b = SplitBatchNorm(3, num_splits=4), SplitBatchNorm(3, num_splits=4)
    with torch.no_grad():
        a.weight.uniform_()
        b.weight.copy_(a.weight)
        fast = a(x.to(memory_format=torch.channels_last))
    slow = b(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
    assert torch.allclose(a.running_var, b.running_var, atol=1e-5)


def test_split_batchnorm_works_with_channels_last() -> None:
    bn = SplitBatchNorm(3, num_splits=4)
    x = torch.randn(8, 3, 5, 5)
    assert torch.allclose(bn(x.to(memory_format=torch.channels_last)), bn(x), atol=1e-6)


def test_symmetric_loss_enqueues_both_views() -> None:
    model = tiny(symmetric=True, K=16)
    x = torch.randn(4, 3, 16, 16)
    loss, _, _ = model(x, x.flip(-1))
    assert torch.isfinite(loss) and int(model.queue_ptr) == 8


@pytest.mark.parametrize("mlp,expected", [(True, nn.Sequential), (False, nn.Linear)])
def test_v2_head_is_an_mlp(mlp: bool, expected: type) -> None:
    assert isinstance(tiny(mlp=mlp).encoder_q.fc, expected)


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"resnet18.*resnet50"):
        tiny(arch="resnet19")


def test_queue_remembers_which_image_each_key_came_from() -> None:
    model = tiny()
    assert model.queue_ids.tolist() == [-1] * 10
    model.enqueue(torch.randn(4, 4), torch.tensor([5, 6, 7, 8]))
    model.enqueue(torch.randn(4, 4))  # ids unknown
    model.enqueue(torch.randn(4, 4), torch.tensor([1, 2, 3, 4]))  # wraps into columns 8, 9, 0, 1
    assert model.queue_ids.tolist() == [3, 4, 7, 8, -1, -1, -1, -1, 1, 2]


def test_older_keys_of_the_query_image_are_not_negatives() -> None:
    model = tiny(K=8, m=1.0)  # m=1: the key encoder stays fixed, so keys are reproducible
    model.eval()  # BatchNorm on running statistics: a key does not depend on its batch
    x, ids = torch.randn(4, 3, 16, 16), torch.tensor([10, 11, 12, 13])
    with torch.no_grad():
        k = F.normalize(model.encoder_k(x), dim=1)
    others = F.normalize(torch.randn(4, 4), dim=1)

    def step(with_ids: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.queue_ptr.zero_()
        model.enqueue(k, ids)  # the same images' keys, a step ago
        model.enqueue(others, torch.tensor([20, 21, 22, 23]))
        _, logits, labels = model(x, x, ids if with_ids else None)
        return F.cross_entropy(logits, labels, reduction="none").detach(), logits

    masked, logits = step(with_ids=True)
    assert torch.isinf(logits[:, 1:5].diagonal()).all()  # each query's own old key is masked
    assert torch.isfinite(logits[:, 5:]).all() and torch.isfinite(logits[0, 2:5]).all()
    # Unmasked, the old key equals the positive (probability p/(2p + rest) instead of
    # p/(p + rest)), so exp(loss) grows by exactly 1 and the loss is at least log 2.
    unmasked, _ = step(with_ids=False)
    assert (unmasked > math.log(2)).all()
    assert torch.allclose(unmasked.exp() - masked.exp(), torch.ones(4), atol=1e-4)


def test_checkpoints_without_queue_ids_still_load() -> None:
    model = tiny()
    state = {k: v for k, v in model.state_dict().items() if k != "queue_ids"}
    model.queue_ids.fill_(3)
    model.load_state_dict(state)  # strict
    assert model.queue_ids.tolist() == [-1] * 10


def test_symmetric_loss_is_the_mean_of_both_directions_by_hand() -> None:
    """Reference: both encoders run by hand, keys from the other view, the pre-step queue."""
    model = tiny(symmetric=True, K=16, m=0.5).eval()  # eval: BatchNorm ignores the shuffle
    ref = tiny(symmetric=True, K=16, m=0.5).eval()
    ref.load_state_dict(model.state_dict())
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss, _, _ = model(x1, x2)
    with torch.no_grad():
        ref.momentum_update()
        queue, t = ref.queue.clone(), ref.cfg.T

        def one_way(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            q = F.normalize(ref.encoder_q(a), dim=1)
            k = F.normalize(ref.encoder_k(b), dim=1)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / t
            return -torch.log_softmax(logits, dim=1)[:, 0].mean()

        expected = 0.5 * (one_way(x1, x2) + one_way(x2, x1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_symmetric_loss_excludes_each_directions_own_nearest_keys_by_hand() -> None:
    """With ids and ``exclude_nearest``, each direction masks the queued keys of the query's
    image and the n queued keys nearest its own positive key (k2's for the swapped views)."""
    model = tiny(symmetric=True, K=16, m=0.5, exclude_nearest=3).eval()
    ref = tiny(symmetric=True, K=16, m=0.5, exclude_nearest=3).eval()
    ref.load_state_dict(model.state_dict())
    x1, x2, ids = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.tensor([1, 5, 9, 12])
    with torch.no_grad():
        ref.momentum_update()  # the key encoder of the model's step
        k1, k2 = (F.normalize(ref.encoder_k(x), dim=1) for x in (x1, x2))
        # queued near-copies of both views' keys: each direction has other nearest keys
        queue = torch.cat([k1, k2, torch.randn(8, 4)]) + 0.05 * torch.randn(16, 4)
        queue = F.normalize(queue, dim=1).T.contiguous()
    for m in (model, ref):
        m.queue.copy_(queue)
        m.queue_ids.copy_(torch.arange(16) % 8)  # images 0-7, two keys each: 1 and 5 are own
    loss, _, _ = model(x1, x2, ids)
    with torch.no_grad():
        own = ref.queue_ids.unsqueeze(0) == ids.unsqueeze(1)
        t = ref.cfg.T

        def one_way(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            q = F.normalize(ref.encoder_q(a), dim=1)
            near = torch.zeros_like(own)
            near.scatter_(1, (k @ queue).masked_fill(own, -torch.inf).topk(3, dim=1).indices, True)
            l_neg = (q @ queue).masked_fill(own | near, -torch.inf)
            logits = torch.cat([(q * k).sum(1, keepdim=True), l_neg], dim=1) / t
            return -torch.log_softmax(logits, dim=1)[:, 0].mean()

        expected = 0.5 * (one_way(x1, k2) + one_way(x2, k1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_momentum_update_uses_the_scheduled_m() -> None:
    model = tiny(m=0.99)
    model.m = 0.0  # a schedule may set any m; 0 copies the query encoder
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    model.momentum_update()
    for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(q, k)


def test_head_bn_puts_batchnorm_in_the_mlp() -> None:
    model = tiny(head_bn=True)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.encoder_q.fc)
    loss, _, _ = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert torch.isfinite(loss)


def test_local_crops_are_queries_against_their_images_key_by_hand() -> None:
    """Multi-crop: each of the L local views is one more query against the key of ``im_k``,
    with the pre-step queue and the own-image mask; every query view weighs the same."""
    model = tiny(K=16, m=0.5).eval()  # eval: BatchNorm ignores the shuffle
    ref = tiny(K=16, m=0.5).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.tensor([0, 1, 2, 3])
    model.queue_ids[:4] = ref.queue_ids[:4] = torch.tensor([1, 7, 7, 7])  # key 0: image 1's
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    local = torch.randn(8, 3, 8, 8)  # L = 2 small views of the 4 images
    loss, logits, _ = model(x1, x2, ids, local)
    with torch.no_grad():
        ref.momentum_update()
        queue, t = ref.queue.clone(), ref.cfg.T
        k = F.normalize(ref.encoder_k(x2), dim=1)

        def against_k(a: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            q = F.normalize(ref.encoder_q(a), dim=1)
            neg = (q @ queue).masked_fill(ref.queue_ids.unsqueeze(0) == own.unsqueeze(1), -1e9)
            logits = torch.cat([(q * k[own]).sum(1, keepdim=True), neg], dim=1) / t
            return -torch.log_softmax(logits, dim=1)[:, 0].mean()

        expected = (against_k(x1, ids) + 2 * against_k(local, torch.cat([ids, ids]))) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logits.shape == (4, 17)  # accuracy stays that of the two global views
    assert int(model.queue_ptr) == 4  # only the global keys are enqueued


def test_exclude_nearest_leaves_the_keys_nearest_the_positive_out_of_the_negatives() -> None:
    """Reference by hand: the n queued keys most similar to each query's key, its own image's
    older keys aside, are dropped from the softmax; everything else is the plain InfoNCE."""
    n = 3
    model = tiny(K=16, m=1.0, exclude_nearest=n).eval()  # eval: a key ignores its batch
    ref = tiny(K=16, m=1.0).eval()
    ref.load_state_dict(model.state_dict())
    x, ids = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        k = F.normalize(ref.encoder_k(x), dim=1)
        q = F.normalize(ref.encoder_q(x), dim=1)
    others = F.normalize(torch.randn(12, 4), dim=1)
    for m in (model, ref):  # the queue: old keys of images 0-3, then 12 others
        m.queue_ptr.zero_()
        m.enqueue(k, ids)
        m.enqueue(others, torch.arange(10, 22))
    queue, queue_ids = ref.queue.clone(), ref.queue_ids.clone()
    loss, logits, _ = model(x, x, ids)

    sim = (k @ queue).masked_fill(queue_ids[None] == ids[:, None], float("-inf"))
    nearest = sim.topk(n, dim=1).indices
    expected = []
    for i in range(4):
        keep = [j for j in range(16) if queue_ids[j] != ids[i] and j not in nearest[i]]
        row = torch.cat([(q[i] * k[i]).sum().view(1), q[i] @ queue[:, keep]]) / ref.cfg.T
        expected.append(-torch.log_softmax(row, dim=0)[0])
    assert len(keep) == 16 - 1 - n
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert torch.isinf(logits[:, 1:]).sum(1).tolist() == [1 + n] * 4
    # Without the option the same step keeps them: the loss differs.
    plain, _, _ = ref(x, x, ids)
    assert plain.item() != pytest.approx(loss.item(), rel=1e-3)


def test_exclude_nearest_is_refused_without_a_queue_or_below_zero() -> None:
    from moco.config import TrainConfig
    from moco.recipe import check_config

    def cfg(**kw: object) -> TrainConfig:
        return TrainConfig(data="d", out="o", batch_size=4, moco_k=10, moco_m=0.99, **kw)

    check_config(cfg(exclude_nearest=2), num_images=100)
    for bad in (dict(exclude_nearest=-1), dict(exclude_nearest=2, mechanism="memory-bank")):
        with pytest.raises(ValueError, match="--exclude-nearest"):
            check_config(cfg(**bad), num_images=100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about a missing CUDA")
def test_compile_encoders_on_cpu_does_not_warn_about_cuda() -> None:
    """``--compile`` on a CPU: no "No CUDA runtime is found" (torch warns once per process)."""
    code = (
        "import torch; from torch import nn; from moco.model import compile_encoders\n"
        "m = nn.Module(); m.encoder_q = nn.Linear(4, 2); m.encoder_k = nn.Linear(4, 2)\n"
        "compile_encoders(m)\n"
        "m.encoder_q(torch.ones(3, 4)).sum().backward()  # a training step compiles\n"
        "assert m.encoder_q.weight.grad is not None"
    )
    assert "No CUDA runtime" not in fresh_compile_stderr(code)
