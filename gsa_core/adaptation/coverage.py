"""Coverage analysis: which queries and keys have a splat near them.

GSA routes attention through splats, so a token far from every alive splat has all its features
underflowing towards zero: its attention is then decided by whichever splat is least far, not by what
the token is. A token counts as **covered** when its nearest alive splat is within ``radius`` standard
deviations, measured as the RMS per axis of the Mahalanobis distance: ``sqrt(min_s maha_s(x) / d)``.
For a token drawn from a splat's own Gaussian this is about 1, so the default radius 2 flags tokens
outside every splat's bulk.

Everything here is analysis (no gradients); the visualisation and the loggers read :class:`CoverageMap`
and :func:`coverage_report`, the coverage-gap birth policy reads the worst covered tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gsa_core.adaptation.statistics import DEFAULT_COVERAGE_RADIUS, features_and_distance, worst_covered
from gsa_core.bank import SplatBank


@dataclass
class CoverageMap:
    """Per-token coverage of ``x [..., H, n, d]``.

    ``distance [..., H, n]``: RMS distance in standard deviations to the nearest alive splat;
    ``nearest [..., H, n]``: that splat's slot index (-1 when no slot is alive);
    ``covered [..., H, n]``: ``distance <= radius``.
    """

    distance: Tensor
    nearest: Tensor
    covered: Tensor
    radius: float

    def fraction(self) -> Tensor:
        """Fraction of covered tokens per head, ``[H]`` (leading batch dims pooled)."""
        c = self.covered.float()
        return c.reshape(-1, *c.shape[-2:]).mean((0, 2))


@torch.no_grad()
def coverage_map(bank: SplatBank, x: Tensor, radius: float = DEFAULT_COVERAGE_RADIUS) -> CoverageMap:
    """Coverage of every token of ``x [..., H, n, d]`` by ``bank``'s alive splats."""
    maha = bank.mahalanobis(x).masked_fill(~bank.alive.unsqueeze(-2), float("inf"))
    best, nearest = maha.min(-1)
    distance = (best / bank.head_dim).sqrt()
    nearest = nearest.masked_fill(~torch.isfinite(best), -1)
    return CoverageMap(distance=distance, nearest=nearest, covered=distance <= radius, radius=radius)


@torch.no_grad()
def coverage_report(
    bank: SplatBank, queries: Tensor | None, keys: Tensor | None, radius: float = DEFAULT_COVERAGE_RADIUS
) -> dict[str, object]:
    """Plain-number summary for loggers: fraction covered and mean/max distance, per head and overall,
    for queries and keys (``[..., H, n, d]`` each, either may be None), and how many alive slots are
    the nearest splat of no token at all (``idle_slots``)."""
    out: dict[str, object] = {"radius": radius}
    used = torch.zeros(bank.n_heads, bank.capacity, dtype=torch.bool, device=bank.alive.device)
    for label, x in (("queries", queries), ("keys", keys)):
        if x is None:
            continue
        cmap = coverage_map(bank, x, radius)
        frac = cmap.fraction()
        dist = cmap.distance.reshape(-1, *cmap.distance.shape[-2:]).transpose(0, 1).reshape(bank.n_heads, -1)
        out[label] = {
            "covered": float(frac.mean()),
            "covered_per_head": [float(v) for v in frac],
            "mean_distance": float(dist[torch.isfinite(dist)].mean()) if torch.isfinite(dist).any() else None,
            "max_distance": float(dist[torch.isfinite(dist)].max()) if torch.isfinite(dist).any() else None,
        }
        near = cmap.nearest.reshape(-1, *cmap.nearest.shape[-2:]).transpose(0, 1).reshape(bank.n_heads, -1)
        for head in range(bank.n_heads):
            idx = near[head][near[head] >= 0]
            used[head, idx] = True
    out["idle_slots"] = int((bank.alive & ~used).sum()) if (queries is not None or keys is not None) else None
    return out


@torch.no_grad()
def uncovered_points(
    bank: SplatBank, x: Tensor, max_points: int, radius: float = DEFAULT_COVERAGE_RADIUS
) -> tuple[Tensor, Tensor]:
    """The ``max_points`` worst covered tokens of ``x [..., H, n, d]`` per head that lie beyond ``radius``:
    ``points [H, max_points, d]`` and ``distance [H, max_points]``, worst first, ``-inf`` rows empty."""
    _, dist = features_and_distance(bank, x)
    h, d = bank.n_heads, bank.head_dim
    pts = x.float().reshape(-1, h, x.shape[-2], d).transpose(0, 1).reshape(h, -1, d)
    dist = dist.reshape(-1, h, x.shape[-2]).transpose(0, 1).reshape(h, -1)
    dist = dist.masked_fill(dist <= radius, float("-inf")).nan_to_num(posinf=1e30, neginf=float("-inf"))
    return worst_covered(pts, dist, max_points)


__all__ = ["CoverageMap", "coverage_map", "coverage_report", "uncovered_points"]
