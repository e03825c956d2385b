"""The two designs MoCo was compared with: end-to-end and the memory bank (MoCo, section 3.2).

All three mechanisms share the query encoder, the augmentations, InfoNCE with temperature T, the
optimizer and the schedule; they differ only in where a query's keys come from (Figure 2):

- **moco** (``moco.model.MoCo``): keys from a momentum encoder, K negatives from a FIFO queue.
- **end-to-end** (``EndToEnd``): keys from the query encoder itself, with gradients through both
  views; the negatives are the other images of the mini-batch, so K = batch - 1 and the
  dictionary is only as large as the batch.
- **memory-bank** (``MemoryBank``, Wu et al. 2018, InstDisc, https://arxiv.org/abs/1805.01978):
  one stored feature per image of the dataset; a query's positive is its own image's entry and K
  negatives are drawn from the bank at random. After each step the batch's entries move towards
  the new queries, ``v <- t * v + (1 - t) * q``, re-normalised. The keys are thus computed by the
  encoder at many past steps, which is the inconsistency the momentum encoder removes.

``build_model`` returns the one a ``ModelConfig`` names; each is called as
``loss, logits, labels = model(im_q, im_k, ids)`` with the positive in column 0 of the logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moco.batchnorm import SplitBatchNorm, splitting
from moco.config import MECHANISMS
from moco.distributed import concat_all_gather, distributed
from moco.loss import batch_logits, info_nce, moco_logits
from moco.model import MoCo, ModelConfig, make_encoder


class EndToEnd(nn.Module):
    """One encoder for queries and keys, trained through both; the batch is the dictionary.

    BatchNorm leaks as in MoCo (a query's positive key normalised with its own batch), so the
    key pass runs on a shuffled batch with ``bn_splits`` BatchNorm groups while the query pass
    normalises over the whole batch. Under DDP the negatives are the keys of every rank's batch
    (the other ranks' without gradient, as gathered), and the shuffle stays within a rank.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_q = make_encoder(cfg, splits=cfg.bn_splits)
        for layer in self.encoder_q.modules():
            if isinstance(layer, SplitBatchNorm):
                layer.num_splits = 1  # the query pass; the key pass splits (``_keys``)

    def _queries(self, im: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(im), dim=1)

    def _keys(self, im: torch.Tensor) -> torch.Tensor:
        perm = torch.randperm(im.shape[0], device=im.device)
        with splitting(self.encoder_q, self.cfg.bn_splits):
            k = F.normalize(self.encoder_q(im[perm]), dim=1)
        return k[torch.argsort(perm)]

    def _all_keys(
        self, k: torch.Tensor, ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Every rank's keys (this rank's keeping their gradient), their ids, this rank's offset."""
        if not distributed():
            return k, ids, 0
        rank, n = dist.get_rank(), k.shape[0]
        gathered = concat_all_gather(k.detach())
        k_all = torch.cat([gathered[: rank * n], k, gathered[(rank + 1) * n :]])
        ids_all = None if ids is None else concat_all_gather(ids.to(k.device, torch.long))
        return k_all, ids_all, rank * n

    def _loss(
        self, q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_all, ids_all, offset = self._all_keys(k, ids)
        logits, labels = batch_logits(q, k_all, self.cfg.T, offset, ids, ids_all)
        return info_nce(logits, labels), logits, labels

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE of each query against its own key and the batch's other keys (K = N - 1)."""
        loss, logits, labels = self._loss(self._queries(im_q), self._keys(im_k), ids)
        if self.cfg.symmetric:
            loss2, _, _ = self._loss(self._queries(im_k), self._keys(im_q), ids)
            loss = 0.5 * (loss + loss2)
        return loss, logits, labels


class MemoryBank(nn.Module):
    """InstDisc's memory bank: a query against its own image's stored feature and K random ones.

    The second view is used only with ``symmetric`` (both views are then queries, and the bank
    moves towards their mean). The bank is a buffer, so it is saved in every checkpoint and a
    resumed run continues from the same entries; under DDP every rank applies every rank's
    updates, so the banks stay identical.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.bank_size < 1:
            raise ValueError("the memory bank needs the number of training images (bank_size)")
        self.cfg = cfg
        self.encoder_q = make_encoder(cfg, splits=1)
        self.register_buffer("bank", F.normalize(torch.randn(cfg.dim, cfg.bank_size), dim=0))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        saved = state_dict.get(prefix + "bank")
        if saved is not None and saved.shape != self.bank.shape:
            raise ValueError(
                f"the run's memory bank holds {saved.shape[1]} images but the folder now has "
                f"{self.bank.shape[1]}: resume needs the same images (start a new --out)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def sample(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K bank indexes drawn uniformly (with replacement, as InstDisc), and the NxK mask of
        those that are a query's own image: never its negative."""
        idx = torch.randint(0, self.cfg.bank_size, (self.cfg.K,), device=self.bank.device)
        return idx, idx.unsqueeze(0) == ids.unsqueeze(1)

    @torch.no_grad()
    def update(self, q: torch.Tensor, ids: torch.Tensor) -> None:
        """``v <- t * v + (1 - t) * q``, re-normalised, for every rank's batch."""
        q, ids = concat_all_gather(q.float()), concat_all_gather(ids)
        t = self.cfg.bank_t
        self.bank[:, ids] = F.normalize(t * self.bank[:, ids] + (1 - t) * q.T, dim=0)

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE of each query against its bank entry and K sampled entries; then the update."""
        if ids is None:
            raise ValueError("the memory bank needs each image's dataset index (ids)")
        ids = ids.to(self.bank.device, torch.long)
        q = F.normalize(self.encoder_q(im_q), dim=1)
        positive = self.bank[:, ids].T.clone()  # NxC, the stored features of the same images
        idx, same = self.sample(ids)
        negatives = self.bank[:, idx].clone()  # CxK
        logits, labels = moco_logits(q, positive, negatives, self.cfg.T, exclude=same)
        loss, new = info_nce(logits, labels), q
        if self.cfg.symmetric:
            q2 = F.normalize(self.encoder_q(im_k), dim=1)
            logits2, _ = moco_logits(q2, positive, negatives, self.cfg.T, exclude=same)
            loss, new = 0.5 * (loss + info_nce(logits2, labels)), 0.5 * (q + q2)
        self.update(new.detach(), ids)
        return loss, logits, labels


Model = MoCo | EndToEnd | MemoryBank


def build_model(cfg: ModelConfig) -> Model:
    """The model of ``cfg.mechanism``: moco, end-to-end or memory-bank."""
    if cfg.mechanism == "moco":
        return MoCo(cfg)
    if cfg.mechanism == "end-to-end":
        return EndToEnd(cfg)
    if cfg.mechanism == "memory-bank":
        return MemoryBank(cfg)
    raise ValueError(f"Unknown --mechanism {cfg.mechanism!r}; valid: {', '.join(MECHANISMS)}")
