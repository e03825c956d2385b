"""MoCo: a query encoder, a momentum key encoder and a FIFO queue of negative keys.

MoCo v1 https://arxiv.org/abs/1911.05722, v2 https://arxiv.org/abs/2003.04297.
Symbols, as in the papers:
    K: number of negative keys held in the queue (65536 in the paper; small data needs less).
    m: momentum of the key encoder, ``theta_k <- m * theta_k + (1 - m) * theta_q`` (0.999).
    T: softmax temperature (0.07 in v1, 0.2 in v2).
    dim: width of the normalised embedding compared by the loss (128).
The momentum actually applied is ``MoCo.m``, which starts at ``m`` and which training may move
along a schedule (moco.schedule.cosine_momentum rises to 1, BYOL / MoCo v3).
BatchNorm leaks information between the samples of a batch, which lets the model cheat on the
pretext task: a query and its positive key computed in the same BatchNorm batch share a batch
"signature". The official code shuffles the key batch across GPUs ("shuffle BN"). On one device
the official CIFAR demo splits BatchNorm into groups and shuffles the keys between them; here only
the key encoder is split (``bn_splits`` groups of shuffled keys) while the query encoder normalises
over the whole batch, which carries no group signature to match, so the costly backward pass runs
on plain BatchNorm. Under DDP the key batch is shuffled across ranks.

On a small collection the queue covers much of the data: with K keys of N images, an older key of
the very image being queried sits in the queue with probability about K/N. Treated as a negative,
it teaches the encoder to tell two augmentations of one image apart, the opposite of the pretext
task. The queue therefore remembers which image each key came from, and a query's own image is
masked out of its negatives (on ImageNet, K/N = 5%, this changes little).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moco.batchnorm import split_batchnorm
from moco.compiling import quiet_cuda_extension_warning
from moco.distributed import concat_all_gather, distributed
from moco.encoders import build_encoder, feature_dim
from moco.loss import info_nce, moco_logits


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    small_stem: bool = False
    dim: int = 128
    K: int = 65536
    m: float = 0.999
    T: float = 0.2
    mlp: bool = True
    symmetric: bool = False
    bn_splits: int = 1
    sync_bn: bool = False
    head_bn: bool = False  # BatchNorm after the MLP head's hidden layer (SimCLR v2, MoCo v3)
    exclude_nearest: int = 0  # queued keys nearest a query's key left out of its negatives
    mechanism: str = "moco"  # where keys come from: moco, end-to-end, memory-bank (mechanisms.py)
    bank_size: int = 0  # memory-bank: one entry per training image
    bank_t: float = 0.5  # memory-bank: momentum of an entry's update (InstDisc's 0.5)


def make_encoder(cfg: ModelConfig, splits: int) -> nn.Module:
    """The backbone with its projection head (v1 linear, v2 MLP), BatchNorm split or synced."""
    net = build_encoder(cfg.arch, num_classes=cfg.dim, small_stem=cfg.small_stem)
    if cfg.mlp:  # v2: a 2-layer MLP head replaces the linear fc
        width = feature_dim(cfg.arch)
        norm: list[nn.Module] = [nn.BatchNorm1d(width)] if cfg.head_bn else []
        net.fc = nn.Sequential(
            nn.Linear(width, width, bias=not cfg.head_bn),
            *norm,
            nn.ReLU(inplace=True),
            net.fc,
        )
    if splits > 1:
        split_batchnorm(net, splits)
    if cfg.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def compile_encoders(model: nn.Module) -> None:
    """``torch.compile`` each encoder of ``model`` in place (state-dict keys unchanged).

    The encoders hold nearly all the step's time. Compiling the whole MoCo module instead fails
    at the first backward: inductor drops the queue's defensive clone, so the enqueue at the end
    of ``forward`` overwrites, in place, the tensor the negatives' gradient needs.
    """
    quiet_cuda_extension_warning()
    for name in ("encoder_q", "encoder_k"):
        encoder = getattr(model, name, None)
        if isinstance(encoder, nn.Module):
            encoder.compile()


class MoCo(nn.Module):
    """Query encoder trained by backprop, key encoder by momentum, queue of K negatives."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_q = make_encoder(cfg, splits=1)
        self.encoder_k = make_encoder(cfg, splits=cfg.bn_splits)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.m = cfg.m  # the momentum of the next update; a schedule may change it every step
        for p in self.encoder_k.parameters():
            p.requires_grad = False  # only the momentum update changes the key encoder
        self.register_buffer("queue", F.normalize(torch.randn(cfg.dim, cfg.K), dim=0))  # CxK
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # The image each key came from (-1: none), to mask a query's own image out of its negatives.
        self.register_buffer("queue_ids", torch.full((cfg.K,), -1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # Checkpoints written before the queue kept image ids: their keys' images are unknown.
        state_dict.setdefault(prefix + "queue_ids", torch.full_like(self.queue_ids, -1))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, with m = ``self.m``."""
        q_params = list(self.encoder_q.parameters())
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, self.m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - self.m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Replace the oldest keys with ``keys`` (NxC, gathered from all ranks), FIFO.

        ``ids`` (N) are the dataset indexes of the keys' images; None records them as unknown.
        """
        if ids is None:
            ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        keys = concat_all_gather(keys.float())[-self.cfg.K :]
        ids = concat_all_gather(ids.to(keys.device, torch.long))[-self.cfg.K :]
        n, ptr = keys.shape[0], int(self.queue_ptr)
        idx = (torch.arange(n, device=keys.device) + ptr) % self.cfg.K  # wraps past the end
        self.queue[:, idx] = keys.T
        self.queue_ids[idx] = ids
        self.queue_ptr[0] = (ptr + n) % self.cfg.K

    def _same_image(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """NxK mask of the queued keys that come from each query's own image."""
        if ids is None:
            return None
        return self.queue_ids.unsqueeze(0) == ids.to(self.queue_ids.device).unsqueeze(1)

    @torch.no_grad()
    def _not_negatives(self, k: torch.Tensor, same: torch.Tensor | None) -> torch.Tensor | None:
        """NxK mask of the queued keys that are not negatives of the queries whose keys are ``k``.

        A query's own image, and with ``exclude_nearest`` = n also the n queued keys nearest its
        positive key: in a collection, those are often the same object seen otherwise (the same
        emoji by another vendor, the same product in another photo), which InfoNCE would push
        away (false-negative elimination, Huynh et al. 2022, https://arxiv.org/abs/2011.11765).
        ``same``: ``_same_image``'s mask of the batch (None: no ids).
        """
        n = min(self.cfg.exclude_nearest, self.cfg.K)
        if n <= 0:
            return same
        sim = k.float() @ self.queue  # NxK, before this batch is enqueued
        if same is not None:
            sim = sim.masked_fill(same, float("-inf"))  # own-image keys are out already
        near = torch.zeros_like(sim, dtype=torch.bool)
        near.scatter_(1, sim.topk(n, dim=1).indices, True)
        return near if same is None else near | same

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Key features of a shuffled batch, so that BatchNorm groups differ from the queries'."""
        if distributed():
            world, rank = dist.get_world_size(), dist.get_rank()
            x = concat_all_gather(im_k)
            perm = torch.randperm(x.shape[0], device=x.device)
            dist.broadcast(perm, src=0)
            n = im_k.shape[0]
            k = F.normalize(self.encoder_k(x[perm.view(world, n)[rank]]), dim=1)
            k_all = concat_all_gather(k)
            return k_all[torch.argsort(perm)].view(world, n, -1)[rank]  # un-shuffle
        perm = torch.randperm(im_k.shape[0], device=im_k.device)
        k = F.normalize(self.encoder_k(im_k[perm]), dim=1)
        return k[torch.argsort(perm)]

    def forward(
        self,
        im_q: torch.Tensor,
        im_k: torch.Tensor,
        ids: torch.Tensor | None = None,
        local: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training step's loss; also updates the key encoder and the queue.

        Args:
            im_q, im_k: two augmented views of the same N images.
            ids: the images' dataset indexes (N); older keys of the same images in the queue are
                then not used as negatives. None: every queued key is a negative (the paper).
            local: multi-crop's small views, L x N of them (all N images' first view, then the
                second ...): each is one more query against its image's key of ``im_k``.

        Returns:
            loss (the mean over every query view), and the logits Nx(1+K) and labels of the
            (im_q, im_k) pair for accuracy.
        """
        self.momentum_update()
        q = F.normalize(self.encoder_q(im_q), dim=1)  # NxC
        k = self._keys(im_k)  # NxC
        own = self._same_image(ids)  # one mask for every query view; the nearest keys are per key
        queue, excluded = self.queue.clone().detach(), self._not_negatives(k, own)
        logits, labels = moco_logits(q, k, queue, self.cfg.T, exclude=excluded)
        loss = info_nce(logits, labels)
        keys, key_ids, views = k, ids, 1
        if self.cfg.symmetric:  # swap the roles of the two views and average
            q2 = F.normalize(self.encoder_q(im_k), dim=1)
            k2 = self._keys(im_q)
            excluded2 = self._not_negatives(k2, own)
            loss = loss + info_nce(*moco_logits(q2, k2, queue, self.cfg.T, exclude=excluded2))
            keys = torch.cat([k, k2])
            key_ids = None if ids is None else torch.cat([ids, ids])
            views = 2
        if local is not None:  # every query view weighs the same, as in SwAV's multi-crop
            n_local = local.shape[0] // im_q.shape[0]
            q_local = F.normalize(self.encoder_q(local), dim=1)  # (L*N)xC
            mask = None if excluded is None else excluded.repeat(n_local, 1)
            pos = k.repeat(n_local, 1)
            local_loss = info_nce(*moco_logits(q_local, pos, queue, self.cfg.T, exclude=mask))
            loss, views = loss + n_local * local_loss, views + n_local
        self.enqueue(keys, key_ids)
        return loss / views, logits, labels
