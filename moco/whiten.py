"""A linear map fitted on the user's own images at export: features centred, or whitened.

Why centre: features pooled after a ReLU are all positive and share one large mean direction,
so every pair of images is similar (cosine ~0.8) and the small differences that rank neighbours
ride on a common offset; kNN's softmax at T=0.1 over such scores is nearly flat. Subtracting the
mean of the collection's features removes the offset, from a mean that a few hundred images
estimate well (docs/pretraining.md, "Centring and whitening").

Why whiten: a few directions also carry most of the variance (colour, size), and search gains
when every direction counts alike (whitening, the standard post-processing of retrieval
features, e.g. Jégou & Chum 2012, https://doi.org/10.1007/978-3-642-33709-3_55). The eigenvalues
are shrunk toward their mean (``SHRINK``) so that directions the sample barely saw are not blown
up into noise, and the whitened features are rotated back to the original axes (ZCA, not PCA,
whitening): cosine similarity is the same either way, but a linear probe that standardises
each dimension would, in the principal axes, in effect whiten without shrinkage and overfit
(it lost 5 points on emoji that way; in the original axes it keeps its accuracy). Measured on
emoji across vendors: +5.4 R@1 at the training size (+7.6 with layers 2-4), kNN +0.8, probe
within a point (-0.8 to -0.2). Below ``MIN_IMAGES_PER_DIM`` images per dimension the
covariance is too poorly known (Tux Paint's 493 images for 512 dimensions lost 3 points of
kNN): "auto" centres instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FITS = ("none", "center", "whiten", "auto")
SHRINK = 1.0
"""Added to every eigenvalue, as a multiple of their mean, before the inverse square root."""
MIN_IMAGES_PER_DIM = 2
"""Whitening D-dimensional features needs at least this many images per dimension."""
PREFIX = "fit."
"""Key prefix of the map's tensors in an encoder's weights file."""


def resolve(fit: str, n: int, d: int) -> str:
    """The kind of map ``fit`` means for ``n`` images of ``d``-dimensional features: "auto" is
    "whiten" with at least ``MIN_IMAGES_PER_DIM`` images per dimension, else "center"."""
    if fit not in FITS:
        raise ValueError(f"Unknown fit {fit!r}; valid: {', '.join(FITS)}")
    if fit == "auto":
        return "whiten" if n >= MIN_IMAGES_PER_DIM * d else "center"
    return fit


def kind(tensors: dict[str, torch.Tensor]) -> str:
    """Which map ``fit_map`` made: "whiten", "center" or "none"."""
    t = {k.removeprefix(PREFIX) for k in tensors}
    return "whiten" if "matrix" in t else "center" if "mean" in t else "none"


class TooFewImages(ValueError):
    """Whitening asked of fewer images than it needs (``MIN_IMAGES_PER_DIM`` per dimension)."""


def fit_map(feats: torch.Tensor, fit: str) -> dict[str, torch.Tensor]:
    """The map of kind ``fit`` for features ``feats`` (N x D, L2-normalised here, as search
    sees them): tensors for ``Fitted``.

    "center" gives ``mean``; "whiten" also ``matrix`` (D x D, symmetric: the covariance's
    shrunk inverse square root); "auto" is ``resolve``'s choice; "none" gives nothing.
    """
    fit = resolve(fit, *feats.shape)
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
        out["matrix"] = (vectors * values.rsqrt() @ vectors.T).float()  # ZCA
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
