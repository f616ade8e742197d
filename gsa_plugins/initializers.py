"""Initializers: fill a bank's alive slots from calibration queries and keys.

Three strategies, each a params model that *is* the initializer (``registry.build("initializer",
name, params)``):

- ``random``: centers drawn from a Gaussian fitted to the data (a unit Gaussian without data),
  scales from the data's spread;
- ``kmeans``: k-means++ seeding then Lloyd iterations on the pooled queries and keys of every head,
  all heads at once (``[H, N, d]`` tensors, no loop over heads); scales from each cluster's spread,
  amplitudes from cluster sizes;
- ``pca``: centers on the principal axes at ± multiples of each axis' standard deviation, scales from
  the residual variance (probabilistic PCA).

All of them handle no data (``None``), fewer vectors than slots, duplicate points, zero variance and
rank-deficient data, every covariance kind, write only alive slots, and are deterministic under the
``generator`` (random numbers are drawn on the generator's device and moved to the data's).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.errors import CalibrationError
from gsa_core.registry import StrategyParams

MIN_SCALE = 1e-3
# Smallest splat std relative to the head's overall data spread (sqrt of the mean per-axis variance):
# directions along which the calibration data never varied still get a usable width.
REL_MIN_SCALE = 1e-2


# ----------------------------------------------------------------------------- shared helpers
def pooled_vectors(bank: SplatBank, queries: Tensor | None, keys: Tensor | None) -> Tensor | None:
    """Queries and keys of each head stacked to ``[H, N, d]`` fp32, or None without data."""
    parts = [t for t in (queries, keys) if t is not None]
    if not parts:
        return None
    for t in parts:
        if t.dim() != 3 or t.shape[0] != bank.n_heads or t.shape[-1] != bank.head_dim:
            raise CalibrationError(
                f"calibration vectors must be [{bank.n_heads} heads, N, {bank.head_dim}], got {tuple(t.shape)}"
            )
    data = torch.cat([t.float() for t in parts], dim=1)
    bad = ~torch.isfinite(data).all(-1).all(-1)
    if bad.any():
        heads = bad.nonzero().flatten().tolist()
        raise CalibrationError(f"calibration vectors contain NaN or Inf in head(s) {heads}")
    return data if data.shape[1] > 0 else None


def head_moments(data: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head mean ``[H, d]`` (fp32) and covariance ``[H, d, d]`` (fp64, ``N-1`` denominator)."""
    mean = data.double().mean(1)
    centred = data.float() - mean.float().unsqueeze(1)
    cov = (centred.transpose(1, 2) @ centred).double() / max(1, data.shape[1] - 1)
    return mean.float(), 0.5 * (cov + cov.transpose(1, 2))


def scale_floor(cov: Tensor | None, n_heads: int) -> Tensor:
    """Smallest splat std per head ``[H]``: ``REL_MIN_SCALE`` of the data's spread, at least ``MIN_SCALE``."""
    if cov is None:
        return torch.full((n_heads,), MIN_SCALE)
    spread = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).mean(-1).sqrt().float()
    return (REL_MIN_SCALE * spread).clamp_min(MIN_SCALE).nan_to_num(MIN_SCALE, MIN_SCALE, MIN_SCALE)


def alive_rank(bank: SplatBank) -> tuple[Tensor, Tensor]:
    """Index of every slot among its head's alive slots ``[H, K]`` (0 for dead ones), and ``n_alive [H]``."""
    alive = bank.alive.detach().cpu().long()
    return (alive.cumsum(1) - 1).clamp_min(0), alive.sum(1)


def regularized_scale_tril_raw(cov: Tensor, min_std: Tensor) -> Tensor:
    """``scale_tril_raw`` rows ``[M, d, d]`` of covariances ``[M, d, d]`` with eigenvalues floored at
    ``min_std [M]`` squared: strict lower triangle of the Cholesky factor, log of its diagonal."""
    sym = 0.5 * (cov.double() + cov.double().transpose(-1, -2))
    sym = torch.where(torch.isfinite(sym), sym, torch.zeros_like(sym))
    evals, evecs = torch.linalg.eigh(sym)
    floor = min_std.double().square().unsqueeze(-1)
    evals = torch.maximum(evals, floor)
    fixed = (evecs * evals.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    lower, info = torch.linalg.cholesky_ex(0.5 * (fixed + fixed.transpose(-1, -2)))
    if bool((info != 0).any()):  # round-off on a near-singular matrix: fall back to the diagonal
        diag = torch.diag_embed(fixed.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt())
        lower = torch.where((info != 0)[:, None, None], diag, lower)
    log_diag = lower.diagonal(dim1=-2, dim2=-1).clamp_min(min_std.double().unsqueeze(-1)).log()
    return (torch.tril(lower, -1) + torch.diag_embed(log_diag)).float()


def write_alive(
    bank: SplatBank,
    centers: Tensor,
    log_amplitude: Tensor,
    axis_std: Tensor,
    covariance: Tensor | None = None,
    min_std: Tensor | float = MIN_SCALE,
) -> None:
    """Write every alive slot: centers ``[H,K,d]``, log-amplitudes ``[H,K]``, per-axis stds ``[H,K,d]``.

    Full-covariance banks use ``covariance [H,K,d,d]`` when given (else ``diag(axis_std²)``);
    ``min_std`` (a float or per-head ``[H]``) floors every std / eigenvalue.
    """
    heads, slots = bank.alive.nonzero(as_tuple=True)
    if heads.numel() == 0:
        return
    h_cpu, s_cpu = heads.cpu(), slots.cpu()
    floor = torch.as_tensor(min_std, dtype=torch.float32).cpu().expand(bank.n_heads)
    std = axis_std.float().cpu()[h_cpu, s_cpu]
    std = torch.where(torch.isfinite(std), std, torch.ones_like(std))
    std = torch.maximum(std, floor[h_cpu].unsqueeze(-1))
    if bank.covariance == "isotropic":
        shape = {"log_scale": std.log().mean(-1)}
    elif bank.covariance == "diagonal":
        shape = {"log_scale": std.log()}
    elif covariance is not None:
        shape = {"scale_tril_raw": regularized_scale_tril_raw(covariance.cpu()[h_cpu, s_cpu], floor[h_cpu])}
    else:
        shape = {"scale_tril_raw": torch.diag_embed(std.log())}
    bank.write_slots(heads, slots, centers=centers.float().cpu()[h_cpu, s_cpu],
                     log_amplitude=log_amplitude.float().cpu()[h_cpu, s_cpu], **shape)


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).cpu()


# ----------------------------------------------------------------------------- random
class RandomInit(StrategyParams):
    """Centers drawn from a Gaussian fitted to the data (unit Gaussian without data)."""

    scale_factor: float = Field(1.0, gt=0, description="splat std as a multiple of the data's spread")

    def initialize(
        self, bank: SplatBank, queries: Tensor | None, keys: Tensor | None, *, generator: torch.Generator
    ) -> None:
        h, k, d = bank.n_heads, bank.capacity, bank.head_dim
        data = pooled_vectors(bank, queries, keys)
        z = _randn((h, k, d), generator)
        if data is None:
            centers = z
            axis_std = torch.full((h, k, d), self.scale_factor)
            write_alive(bank, centers, torch.full((h, k), -math.log(k)), axis_std)
            return
        mean, cov = head_moments(data.cpu())
        evals, evecs = torch.linalg.eigh(cov)
        root_cov = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)).float()
        centers = mean.unsqueeze(1) + z @ root_cov.transpose(-1, -2)
        # Splats far narrower than the data would leave most tokens uncovered: scale with the
        # data's spread shrunk by the number of splats sharing it (one splat per K-th of the volume).
        n_alive = max(1, int(bank.alive.sum(1).max()))
        shrink = self.scale_factor * n_alive ** (-1.0 / d)
        spread = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().float()
        axis_std = (spread * shrink).unsqueeze(1).expand(h, k, d)
        covariance = (cov * shrink**2).unsqueeze(1).expand(h, k, d, d) if bank.covariance == "full" else None
        write_alive(bank, centers, torch.full((h, k), -math.log(n_alive)), axis_std, covariance,
                    min_std=scale_floor(cov, h))


# ----------------------------------------------------------------------------- k-means
def _flat_index(assign: Tensor, k: int) -> Tensor:
    """Cluster ids ``[H, N]`` -> indices into a flattened ``[H*K]`` table."""
    return (assign + torch.arange(assign.shape[0], device=assign.device).unsqueeze(1) * k).reshape(-1)


def nearest_center(x: Tensor, centers: Tensor, active: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """Index of the nearest active center for every point: ``x [H,N,d]``, ``centers [H,K,d]`` -> ``[H,N]``."""
    h, n, _ = x.shape
    k = centers.shape[1]
    csq = centers.square().sum(-1)
    csq = csq.masked_fill(~active, float("inf")).unsqueeze(1)
    step = max(1, chunk_elements // max(1, h * k))
    out = []
    for start in range(0, n, step):
        xs = x[:, start:start + step]
        dist = csq - 2.0 * (xs @ centers.transpose(1, 2))  # ||x||² is the same for every center
        out.append(dist.argmin(-1))
    return torch.cat(out, 1)


def kmeans_plus_plus(x: Tensor, active: Tensor, generator: torch.Generator) -> Tensor:
    """k-means++ seeds ``[H, K, d]`` for all heads at once; slot ``j`` of head ``h`` is a real seed where
    ``active[h, j]`` (inactive seeds are drawn but never influence the others).

    Each seed is a point drawn with probability proportional to its squared distance to the nearest
    earlier seed (inverse-CDF sampling on the generator). Once every point coincides with a seed
    (fewer distinct points than seeds) the next seeds are drawn uniformly, i.e. they duplicate points.
    """
    h, n, d = x.shape
    k = active.shape[1]
    rows = torch.arange(h, device=x.device)
    xsq = x.square().sum(-1)
    seeds = x.new_zeros(h, k, d)

    def sq_dist(c: Tensor) -> Tensor:  # ||x - c||² for one center per head, [H, N]
        return (xsq - 2.0 * (x * c.unsqueeze(1)).sum(-1) + c.square().sum(-1, keepdim=True)).clamp_min(0)

    first = torch.randint(n, (h,), generator=generator, device=generator.device).to(x.device)
    seeds[:, 0] = x[rows, first]
    d2 = sq_dist(seeds[:, 0])
    for j in range(1, k):
        cdf = d2.double().cumsum(1)
        total = cdf[:, -1:]
        cdf = torch.where(total > 0, cdf, torch.arange(1, n + 1, device=x.device, dtype=torch.float64))
        u = torch.rand(h, 1, generator=generator, device=generator.device, dtype=torch.float64).to(x.device)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_max(n - 1)
        seeds[:, j] = x[rows, pick]
        d2 = torch.where(active[:, j:j + 1], torch.minimum(d2, sq_dist(seeds[:, j])), d2)
    return seeds


def lloyd(
    x: Tensor, centers: Tensor, active: Tensor, iterations: int, tol: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations for all heads at once, stopping after ``iterations`` or once at most ``tol`` of
    the points of every head changed cluster.

    Returns ``(centers [H,K,d], assign [H,N], counts [H,K])`` with ``assign`` consistent with the final
    centers. An empty cluster keeps its previous center.
    """
    h, n, d = x.shape
    k = centers.shape[1]
    flat_x = x.reshape(-1, d)
    previous = None
    for it in range(iterations + 1):
        assign = nearest_center(x, centers, active)
        if previous is not None:
            changed = (assign != previous).sum(1).max().item()
            if changed <= tol * n:
                break
        if it == iterations:
            break
        previous = assign
        idx = _flat_index(assign, k)
        counts = torch.bincount(idx, minlength=h * k).view(h, k).to(x.dtype)
        sums = x.new_zeros(h * k, d).index_add_(0, idx, flat_x).view(h, k, d)
        centers = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centers)
    counts = torch.bincount(_flat_index(assign, k), minlength=h * k).view(h, k).to(x.dtype)
    return centers, assign, counts


def kmeans(
    x: Tensor,
    active: Tensor,
    generator: torch.Generator,
    iterations: int = 15,
    *,
    tol: float = 0.0,
    max_points: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """k-means++ then Lloyd on every head of ``x [H, N, d]`` with the active clusters ``active [H, K]``.

    With ``max_points`` the seeding and the iterations run on a random subset of that many points per
    head (the same positions for every head); the returned assignment and counts cover all points.
    Returns ``(centers [H,K,d], assign [H,N], counts [H,K])``.
    """
    n = x.shape[1]
    fit = x
    if max_points is not None and n > max_points:
        idx = torch.randperm(n, generator=generator, device=generator.device)[:max_points].sort().values
        fit = x[:, idx.to(x.device)]
    seeds = kmeans_plus_plus(fit, active, generator)
    centers, assign, counts = lloyd(fit, seeds, active, iterations, tol)
    if fit is not x:
        assign = nearest_center(x, centers, active)
        counts = torch.bincount(_flat_index(assign, centers.shape[1]),
                                minlength=centers.shape[0] * centers.shape[1]).view_as(counts).to(x.dtype)
    return centers, assign, counts


def cluster_scatter(x: Tensor, centers: Tensor, assign: Tensor, full: bool, chunk: int = 2048) -> Tensor:
    """Per-cluster sums of squared residuals: ``[H,K,d]`` per axis, or ``[H,K,d,d]`` outer products."""
    h, n, d = x.shape
    k = centers.shape[1]
    rows = torch.arange(h, device=x.device).unsqueeze(1)
    if not full:
        resid = x - centers[rows, assign]
        return x.new_zeros(h * k, d).index_add_(0, _flat_index(assign, k), resid.square().reshape(-1, d)).view(
            h, k, d)
    out = x.new_zeros(h * k, d * d, dtype=torch.float64)
    for start in range(0, n, chunk):
        a = assign[:, start:start + chunk]
        resid = (x[:, start:start + chunk] - centers[rows, a]).double()
        outer = (resid.unsqueeze(-1) * resid.unsqueeze(-2)).reshape(-1, d * d)
        out.index_add_(0, _flat_index(a, k), outer)
    return out.view(h, k, d, d)


class KMeansInit(StrategyParams):
    """k-means++ and Lloyd on each head's pooled queries and keys (all heads at once)."""

    iterations: int = Field(15, ge=0, description="maximum Lloyd iterations")
    tol: float = Field(1e-3, ge=0, le=1, description="stop once at most this share of points changed cluster")
    max_points: int | None = Field(
        4096, ge=1,
        description="seed and iterate on at most this many pooled vectors per head (a seeded random subset; "
        "None: all); cluster sizes and spreads always use every vector",
    )
    scale_factor: float = Field(1.0, gt=0, description="splat std as a multiple of its cluster's std")
    prior_weight: float = Field(
        1.0, gt=0,
        description="pseudo-points shrinking each cluster's variance towards the head's pooled within-cluster "
        "variance (gives singleton and empty clusters a sensible width)",
    )

    def initialize(
        self, bank: SplatBank, queries: Tensor | None, keys: Tensor | None, *, generator: torch.Generator
    ) -> None:
        h, k = bank.n_heads, bank.capacity
        data = pooled_vectors(bank, queries, keys)
        if data is None:
            RandomInit(scale_factor=self.scale_factor).initialize(bank, None, None, generator=generator)
            return
        data = data.cpu()
        n = data.shape[1]
        mean, cov = head_moments(data)
        floor = scale_floor(cov, h)
        # Standardise per head (centre, divide by the overall spread) so distances are O(d) in fp32.
        spread = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).mean(-1).sqrt().float()
        spread = torch.where(spread > 0, spread, torch.ones_like(spread)).view(h, 1, 1)
        x = (data - mean.unsqueeze(1)) / spread
        rank, n_alive = alive_rank(bank)
        active = torch.arange(k).unsqueeze(0) < n_alive.unsqueeze(1)
        centers, assign, counts = kmeans(x, active, generator, self.iterations, tol=self.tol,
                                         max_points=self.max_points)
        full = bank.covariance == "full"
        scatter = cluster_scatter(x, centers, assign, full)
        w = self.prior_weight
        pooled = scatter.sum(1, keepdim=True) / n
        denom = (counts + w).view(h, k, *([1] * (scatter.dim() - 2)))
        var = (scatter + w * pooled) / denom
        factor = (self.scale_factor * spread) ** 2
        diag_var = (var.diagonal(dim1=-2, dim2=-1) if full else var).float() * factor
        log_amp = (counts.clamp_min(0.5) / n).log()
        # Cluster j of a head goes to that head's j-th alive slot.
        rows = torch.arange(h).unsqueeze(1)
        slot_centers = centers[rows, rank] * spread + mean.unsqueeze(1)
        covariance = (var[rows, rank] * factor.double().unsqueeze(-1)) if full else None
        write_alive(bank, slot_centers, log_amp[rows, rank], diag_var[rows, rank].clamp_min(0).sqrt(),
                    covariance, min_std=floor)


# ----------------------------------------------------------------------------- pca
class PCAInit(StrategyParams):
    """Centers on the principal axes at ± multiples of each axis' std; scales from the residual variance."""

    multiples: tuple[float, ...] = Field(
        (1.0, 2.0), min_length=1,
        description="distances from the mean along each axis, in that axis' std; axes are filled in order of "
        "variance (+m then -m for each multiple) before the next axis; when the slots outnumber "
        "1 + 2·len(multiples)·rank, further rings continue at multiples + max(multiples)",
    )
    include_mean: bool = Field(True, description="put the first alive slot of each head at the data mean")
    axis_scale: float = Field(1.0, gt=0, description="splat std along a used axis, in that axis' std")
    scale_factor: float = Field(1.0, gt=0, description="multiplies every splat std")
    rank_tolerance: float = Field(1e-6, ge=0, description="axes with variance below this share of the largest "
                                  "are treated as absent (rank-deficient data)")

    @field_validator("multiples")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (m > 0 and math.isfinite(m)) for m in value):
            raise ValueError("multiples must be positive finite numbers")
        return value

    def initialize(
        self, bank: SplatBank, queries: Tensor | None, keys: Tensor | None, *, generator: torch.Generator
    ) -> None:
        h, k, d = bank.n_heads, bank.capacity, bank.head_dim
        data = pooled_vectors(bank, queries, keys)
        if data is None:
            mean, cov = torch.zeros(h, d), torch.eye(d, dtype=torch.float64).expand(h, d, d).clone()
        else:
            mean, cov = head_moments(data.cpu())
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)  # descending variance
        top = evals[:, :1]
        rank = ((evals > self.rank_tolerance * top) & (top > 0)).sum(1)  # [H]

        slot_rank, n_alive = alive_rank(bank)
        mult = torch.tensor(self.multiples, dtype=torch.float64)
        per_axis = 2 * len(self.multiples)
        t = slot_rank - int(self.include_mean)  # -1: the mean slot
        r = rank.clamp_min(1).unsqueeze(1)
        ring, within = t.clamp_min(0) // (per_axis * r), t.clamp_min(0) % (per_axis * r)
        axis = within // per_axis
        sign = 1.0 - 2.0 * (within % 2).double()
        distance = mult[(within % per_axis) // 2] + ring.double() * mult.max()
        on_axis = (t >= 0) & (rank.unsqueeze(1) > 0)
        rows = torch.arange(h).unsqueeze(1)
        axis_std = evals.sqrt()[rows, axis]  # [H, K]
        offset = torch.where(on_axis, sign * distance * axis_std, torch.zeros_like(axis_std))
        direction = evecs.transpose(1, 2)[rows, axis]  # [H, K, d]: the axis vector of every slot
        centers = mean.unsqueeze(1) + (offset.unsqueeze(-1) * direction).float()

        # Axes that carry centers get a width of axis_scale of their std; the others share the residual
        # variance (the probabilistic-PCA noise: the mean variance of the unused axes).
        n_on_axis = (n_alive - int(self.include_mean)).clamp_min(0)
        used_axes = torch.minimum(rank, (n_on_axis + per_axis - 1) // per_axis)  # [H]
        used = torch.arange(d).unsqueeze(0) < used_axes.unsqueeze(1)  # [H, d]
        residual = (evals * ~used).sum(1) / (~used).sum(1).clamp_min(1)
        spectrum = torch.where(used, evals * self.axis_scale**2, residual.unsqueeze(1)) * self.scale_factor**2
        if data is None:
            spectrum = torch.full_like(spectrum, self.scale_factor**2)
        head_cov = (evecs * spectrum.unsqueeze(-2)) @ evecs.transpose(1, 2)  # [H, d, d]
        axis_sd = head_cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().float().unsqueeze(1).expand(h, k, d)
        covariance = head_cov.unsqueeze(1).expand(h, k, d, d) if bank.covariance == "full" else None
        n_live = n_alive.clamp_min(1).double().unsqueeze(1).expand(h, k)
        floor = scale_floor(cov, h) if data is not None else torch.full((h,), MIN_SCALE)
        write_alive(bank, centers, -n_live.log(), axis_sd, covariance, min_std=floor)
