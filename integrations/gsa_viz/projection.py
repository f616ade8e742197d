"""Two dimensions of one head: the PCA plane of its queries and keys, and Gaussians projected onto it.

Projecting a Gaussian ``N(mu, Sigma)`` onto orthonormal axes ``P [2, d]`` gives exactly ``N(P mu, P Sigma P^T)``
(the marginal on that plane), so a drawn ellipse is the splat's true shadow, not an approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Plane:
    """``mean [d]`` and orthonormal ``axes [2, d]`` (first principal components first); ``explained [2]``: the
    share of the points' variance along each axis."""

    mean: Tensor
    axes: Tensor
    explained: Tensor

    def points(self, x: Tensor) -> Tensor:
        """``x [..., d] -> [..., 2]``."""
        return (x.double() - self.mean) @ self.axes.T

    def gaussians(self, mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``mu [K, d]``, ``sigma [K, d, d]`` -> projected centers ``[K, 2]`` and covariances ``[K, 2, 2]``."""
        p = self.axes
        return self.points(mu), p @ sigma.double() @ p.T


def fit_plane(x: Tensor) -> Plane:
    """The PCA plane of ``x [n, d]`` (``n >= 2``); with ``d == 1`` the second axis is zero."""
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = torch.zeros(2, x.shape[1], dtype=torch.float64)
    axes[: min(2, vh.shape[0])] = vh[:2]
    var = s.square()
    total = float(var.sum())
    explained = torch.zeros(2, dtype=torch.float64)
    if total > 0:
        explained[: min(2, var.shape[0])] = var[:2] / total
    return Plane(mean, axes, explained)


def ellipse(cov: Tensor, n_sigma: float) -> tuple[float, float, float]:
    """``(width, height, angle in degrees)`` of the ``n_sigma`` contour of a 2-D covariance (matplotlib's
    ``Ellipse`` arguments)."""
    values, vectors = torch.linalg.eigh(cov.double())
    values = values.clamp_min(0.0)
    major = vectors[:, 1]
    angle = math.degrees(math.atan2(float(major[1]), float(major[0])))
    return 2 * n_sigma * math.sqrt(float(values[1])), 2 * n_sigma * math.sqrt(float(values[0])), angle


__all__ = ["Plane", "ellipse", "fit_plane"]
