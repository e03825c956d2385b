"""MoCo's linear-evaluation protocol on images: a fresh augmentation each epoch, frozen backbone.

``train_probe_on_images`` is ``main_lincls.py``'s loop (``ProbeConfig.paper()``: SGD lr=30,
momentum 0.9, no weight decay, 100 epochs, RandomResizedCrop + flip, the backbone in eval mode)
with its sanity check that no frozen weight or BatchNorm statistic moved. The everyday probe on
cached features, the ``LinearProbe`` it trains and its files live in ``moco.probe``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from moco.probe import LinearProbe, ProbeConfig, encode_labels, fit_fc


def collate_indexed(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``ImageFiles`` items to (images, dataset indexes) of the readable ones; None if none is."""
    good = [(x, i) for x, i in batch if x is not None]
    if not good:
        return None
    return torch.stack([x for x, _ in good]), torch.tensor([i for _, i in good])


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (head excluded), for ``assert_backbone_unchanged``."""
    return {
        k: v.detach().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")
    }


def assert_backbone_unchanged(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> None:
    """Fail if probing changed any frozen weight or BatchNorm statistic (main_lincls sanity_check).

    BatchNorm in train mode would update its running statistics without any gradient, which is
    why the protocol keeps the backbone in eval mode; this check catches a mistake there.
    """
    before = {k: v for k, v in before.items() if not k.startswith("fc.")}
    after = {k: v for k, v in after.items() if not k.startswith("fc.")}
    if before.keys() != after.keys():
        raise AssertionError(f"Backbone keys changed: {sorted(before.keys() ^ after.keys())[:5]}")
    changed = [k for k in before if not torch.equal(before[k].cpu(), after[k].cpu())]
    if changed:
        raise AssertionError(f"Frozen backbone changed during probing: {changed[:5]}")


def train_probe_on_images(
    backbone: nn.Module,
    paths: Sequence[Path],
    labels: Sequence[Any],
    transform: Callable[[Any], torch.Tensor],
    cfg: ProbeConfig | None = None,
    *,
    classes: Sequence[str] | None = None,
    encoder_hash: str = "",
    dim: int | None = None,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> LinearProbe:
    """MoCo's protocol: a fresh augmentation of every image each epoch, frozen backbone.

    The backbone stays in eval mode (BatchNorm statistics frozen) and without gradients; only the
    linear layer learns. Its weights are compared before and after, as the official code does.

    Args:
        backbone: the encoder, features out (``fc = Identity``).
        paths: labelled image files (broken ones are skipped each epoch).
        labels: their class names or indexes.
        transform: the training augmentation, e.g. RandomResizedCrop + flip + normalise.
        cfg: ``ProbeConfig.paper()`` when None.
        dim: width of the backbone's features; found by a dummy forward pass when None.
    """
    from moco.data import ImageFiles

    cfg = cfg or ProbeConfig.paper()
    y_all, names = encode_labels(labels, classes)
    y_all_t = torch.from_numpy(y_all)
    backbone = backbone.to(device).eval()
    backbone.requires_grad_(False)
    before = backbone_state(backbone)
    torch.manual_seed(cfg.seed)
    if dim is None:
        with torch.no_grad():  # width of the pooled features of a convolutional backbone
            dim = int(backbone(torch.zeros(1, 3, 64, 64, device=device)).shape[1])
    probe = LinearProbe(dim, names, normalize=cfg.normalize, encoder_hash=encoder_hash).to(device)
    if "standardize" in cfg.normalize:
        raise ValueError("The image protocol trains on raw or L2-normalised features only")
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        ImageFiles(list(paths), transform),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=gen,
        num_workers=workers,
        collate_fn=collate_indexed,
        drop_last=False,
    )

    def batches(epoch: int) -> Any:
        backbone.eval()  # the protocol: never BatchNorm in train mode
        for batch in loader:
            if batch is None:
                continue
            x, idx = batch
            with torch.no_grad():
                feats = backbone(x.to(device))
            yield feats, y_all_t[idx].to(device)

    fit_fc(probe, batches, cfg)
    assert_backbone_unchanged(before, backbone_state(backbone))
    return probe.eval()


def paper_train_transform(pre: Any) -> Callable[[Any], torch.Tensor]:
    """main_lincls' training augmentation: RandomResizedCrop + flip, then the encoder's
    normalisation (``pre`` is an ``EncoderConfig`` or any object with its preprocessing fields)."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(
                pre.image_size, interpolation=T.InterpolationMode(pre.interpolation)
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(tuple(pre.mean), tuple(pre.std)),
        ]
    )
