"""InfoNCE over one positive key and K negatives (MoCo, eq. 1): from the queue or the batch.

https://arxiv.org/abs/1911.05722
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moco_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of the (1+K)-way classification that InfoNCE is.

    Args:
        q: NxC normalised queries.
        k: NxC normalised positive keys (one per query).
        queue: CxK normalised negative keys.
        temperature: T; the logits are divided by it.
        exclude: optional NxK mask of queued keys that are not negatives of a query (older keys
            of its own image); their logits become -inf, so they carry no probability or gradient.

    Returns:
        logits Nx(1+K) with the positive in column 0, and N zero labels.
    """
    q, k, queue = q.float(), k.float(), queue.float()  # the similarity is kept in fp32 under AMP
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # NxK
    if exclude is not None:
        l_neg = l_neg.masked_fill(exclude, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # Nx(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits, labels


def batch_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float,
    offset: int = 0,
    ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """End-to-end logits: each query's own key, then every other key of the batch as a negative.

    Args:
        q: NxC normalised queries.
        k: MxC normalised keys of the whole batch (M >= N; over DDP, every rank's), where query
            i's positive is ``k[offset + i]``.
        temperature: T.
        ids, k_ids: optional dataset indexes of the queries' and keys' images; another key of a
            query's own image is then left out (logit -inf), as for MoCo's queue.

    Returns:
        logits Nx M with the positive in column 0 and the other M - 1 keys in order, N zero
        labels: the layout of ``moco_logits``, so accuracy and loss are computed alike.
    """
    q, k = q.float(), k.float()
    n, m = q.shape[0], k.shape[0]
    rows = torch.arange(n, device=q.device)
    sim = q @ k.T  # NxM
    others = torch.ones(n, m, dtype=torch.bool, device=q.device)
    others[rows, rows + offset] = False
    l_pos = sim[rows, rows + offset].unsqueeze(1)
    l_neg = sim[others].view(n, m - 1)
    if ids is not None and k_ids is not None:
        same = k_ids.to(q.device).unsqueeze(0) == ids.to(q.device).unsqueeze(1)
        l_neg = l_neg.masked_fill(same[others].view(n, m - 1), float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return logits, torch.zeros(n, dtype=torch.long, device=q.device)


def info_nce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean InfoNCE loss: cross-entropy of the positive among 1+K candidates."""
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1,)
) -> list[float]:
    """Percentage of rows whose label is among the top-k logits, for each k in ``ks``."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # Nxmaxk
    hit = top.eq(labels.unsqueeze(1))
    return [100.0 * hit[:, : min(k, maxk)].any(dim=1).float().mean().item() for k in ks]
