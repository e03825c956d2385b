"""A linear map fitted on the user's own images at export: features centred, or whitened.

Why centre: features pooled after a ReLU are all positive and share one large mean direction,
so every pair of images is similar (cosine ~0.8) and the small differences that rank neighbours
ride on a common offset. kNN's softmax at T=0.1 over such scores is nearly flat. Subtracting the
mean of the collection's features removes the offset: category kNN rose 5 to 29 points on three
real sets (emoji, Tux Paint, MNIST) with the probe unchanged, from a mean that a few hundred
images estimate well (docs/pretraining.md, "Centring and whitening").

Why whiten (opt-in): a few directions also carry most of the variance (colour, size), and
instance search gains when every direction counts alike (PCA whitening, the standard
post-processing of retrieval features, e.g. Jégou & Chum 2012,
https://doi.org/10.1007/978-3-642-33709-3_55). The eigenvalues are shrunk toward their mean
(``SHRINK``) so directions the sample barely saw are not blown up into noise. Measured: emoji
found across vendors +9 R@1, but the linear probe lost about 5 points and a collection with
fewer images than dimensions collapsed (Tux Paint, ~500 images for 512 dimensions), so
``fit_map`` refuses to whiten below ``MIN_IMAGES_PER_DIM`` images per dimension.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FITS = ("none", "center", "whiten")
SHRINK = 1.0
"""Added to every eigenvalue, as a multiple of their mean, before the inverse square root."""
MIN_IMAGES_PER_DIM = 2
"""Whitening D-dimensional features needs at least this many images per dimension."""
PREFIX = "fit."
"""Key prefix of the map's tensors in an encoder's weights file."""


class TooFewImages(ValueError):
    """Whitening asked of fewer images than it needs (``MIN_IMAGES_PER_DIM`` per dimension)."""


def fit_map(feats: torch.Tensor, fit: str) -> dict[str, torch.Tensor]:
    """The map of kind ``fit`` for features ``feats`` (N x D, L2-normalised here, as search
    sees them): tensors for ``Fitted``.

    "center" gives ``mean``; "whiten" also ``matrix`` (D x D, eigenvectors scaled by the shrunk
    eigenvalues' inverse square roots); "none" gives nothing.
    """
    if fit not in FITS:
        raise ValueError(f"Unknown fit {fit!r}; valid: {', '.join(FITS)}")
    if fit == "none":
        return {}
    x = F.normalize(feats.double(), dim=1)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"Fitting the features needs at least 2 readable images, got {n}")
    mean = x.mean(0)
    out = {"mean": mean.float()}
    if fit == "whiten":
        if n < MIN_IMAGES_PER_DIM * d:
            raise TooFewImages(
                f"Whitening {d}-d features needs at least {MIN_IMAGES_PER_DIM * d} images "
                f"({MIN_IMAGES_PER_DIM} per dimension), got {n}; with fewer, the directions the "
                "images do not span turn into noise. Use --fit center, or more images "
                "(--fit-images, --fit-on)"
            )
        xc = x - mean
        values, vectors = torch.linalg.eigh(xc.T @ xc / n)
        values = values.clamp(min=0) + SHRINK * values.clamp(min=0).mean()
        out["matrix"] = (vectors * values.rsqrt()).flip(1).float()  # largest variance first
    return out


class Fitted(nn.Module):
    """``net``'s features L2-normalised, minus ``mean``, times ``matrix`` if given, and
    L2-normalised again."""

    def __init__(
        self, net: nn.Module, mean: torch.Tensor, matrix: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.float())
        self.register_buffer("matrix", None if matrix is None else matrix.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.net(x).float(), dim=1) - self.mean
        if self.matrix is not None:
            f = f @ self.matrix
        return F.normalize(f, dim=1)


def wrap(net: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``net`` with the map in ``tensors`` (``fit_map``'s, keys with or without ``PREFIX``)."""
    t = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    if not t:
        return net
    return Fitted(net, t["mean"], t.get("matrix"))
