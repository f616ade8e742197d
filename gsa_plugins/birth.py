"""Birth policies: what to write into dead slots."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.adaptation.ops import SplitBirths
from gsa_core.bank import SplatBank
from gsa_core.protocols import Births, SlotStats
from gsa_core.registry import StrategyParams


def clone_births(bank: SplatBank, heads: list[int], targets: list[int], sources: list[int],
                 jitter: float, generator: torch.Generator, amplitude_shift: float = 0.0) -> Births:
    """Copies of ``sources`` moved by ``jitter`` of their scale; ``amplitude_shift`` is added to both
    copy and source log-amplitudes (``-log 2`` makes a mass-preserving split)."""
    if not heads:
        return Births.empty(bank)
    h = torch.tensor(heads, dtype=torch.long)
    src = torch.tensor(sources, dtype=torch.long)
    with torch.no_grad():
        centers = bank.centers[h, src].float()
        shape = bank.shape_params()[h, src].float().clone()
        std = bank.scale_tril()[h, src].diagonal(dim1=-2, dim2=-1)
        noise = torch.randn(centers.shape, generator=generator)
        log_amp = bank.log_amplitude[h, src].float() + amplitude_shift
    return Births(
        heads=h, slots=torch.tensor(targets, dtype=torch.long), centers=centers + jitter * std * noise,
        log_amplitude=log_amp, shape=shape, sources=src, source_log_amplitude=log_amp.clone(),
    )


def hottest_into_dead(bank: SplatBank, stats: SlotStats, min_grad: float,
                      max_per_head: int) -> tuple[list[int], list[int], list[int]]:
    """Pair each head's highest-gradient alive splats (above ``min_grad``) with its dead slots, in order.

    Returns parallel lists ``(heads, target dead slots, source alive slots)``.
    """
    heads: list[int] = []
    targets: list[int] = []
    sources: list[int] = []
    for head in range(bank.n_heads):
        alive = bank.alive[head].cpu()
        dead = (~alive).nonzero().flatten().tolist()
        grad = stats.grad_norm[head].cpu().float().masked_fill(~alive, float("-inf"))
        order = torch.argsort(grad, descending=True, stable=True).tolist()
        hot = [s for s in order if alive[s] and grad[s] > min_grad]
        n = min(len(dead), len(hot), max_per_head)
        heads += [head] * n
        targets += dead[:n]
        sources += hot[:n]
    return heads, targets, sources


class CloneBirth(StrategyParams):
    """Clone the alive splats with the largest center gradients into dead slots."""

    max_per_head: int = Field(4, ge=1)
    min_grad: float = Field(0.0, ge=0, description="only splats whose mean ||dL/dmu|| exceeds this")
    jitter: float = Field(0.1, ge=0, description="offset of the copy, in units of the source's std")

    def propose(self, bank: SplatBank, stats: SlotStats, *, generator: torch.Generator) -> Births:
        heads, targets, sources = hottest_into_dead(bank, stats, self.min_grad, self.max_per_head)
        return clone_births(bank, heads, targets, sources, self.jitter, generator)


# ----------------------------------------------------------------------------- helpers
def _head_typical(bank: SplatBank, head: int) -> tuple[Tensor, Tensor]:
    """Median log-amplitude and median covariance row of a head's alive slots (axis-aligned for full);
    ``(0, log 1)`` when no slot is alive."""
    alive = bank.alive[head].cpu()
    shape_row = bank.shape_params()[head].detach().float().cpu()
    if not bool(alive.any()):
        return torch.zeros(()), torch.zeros(shape_row.shape[1:])
    log_amp = bank.log_amplitude[head].detach().float().cpu()[alive].median()
    if bank.covariance == "full":
        diag = shape_row.diagonal(dim1=-2, dim2=-1)[alive].median(0).values
        return log_amp, torch.diag_embed(diag)
    return log_amp, shape_row[alive].median(0).values


def _axis_std(bank: SplatBank, heads: Tensor, slots: Tensor) -> Tensor:
    """Per-axis standard deviations of the given slots' Gaussians (``sqrt diag Sigma``), ``[n, d]``."""
    lower = bank.scale_tril()[heads, slots].detach().float()
    return lower.square().sum(-1).sqrt()


def _principal_axis(bank: SplatBank, heads: Tensor, slots: Tensor) -> Tensor:
    """Each slot's widest axis times its standard deviation along it, ``[n, d]``."""
    if bank.covariance != "full":
        std = bank.diag_scales()[heads, slots].detach().float()
        axis = std.argmax(-1)
        return torch.nn.functional.one_hot(axis, bank.head_dim).float() * std.gather(-1, axis.unsqueeze(-1))
    cov = bank.covariance_matrix()[heads, slots].detach().double()
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs[..., -1] * evals[..., -1].clamp_min(0).sqrt().unsqueeze(-1)).float()


def _shrunk_shape(bank: SplatBank, heads: Tensor, slots: Tensor, factor: float) -> Tensor:
    """Covariance rows of the given slots with every standard deviation divided by ``factor``."""
    shape = bank.shape_params()[heads, slots].detach().float().clone()
    if bank.covariance == "full":
        diag = shape.diagonal(dim1=-2, dim2=-1)
        lower = torch.tril(shape, -1) / factor
        return lower + torch.diag_embed(diag - math.log(factor))
    return shape - math.log(factor)


def _log_size(bank: SplatBank) -> Tensor:
    """Each slot's geometric-mean standard deviation, as a log: ``log det(Sigma) / (2d)``, ``[H, K]``."""
    return bank.log_det_covariance().detach().float() / (2 * bank.head_dim)


# ----------------------------------------------------------------------------- split / clone
class SplitBirth(StrategyParams):
    """Densify high-gradient splats: split the large ones, clone the small ones; both preserve mass.

    The alive splats with the largest windowed ``||dL/dmu||`` (above ``min_grad``) are chosen, at most
    ``max_per_head`` per head and one dead slot each. A splat whose size (geometric-mean std) exceeds
    ``split_ratio`` times its head's median is **split**: parent and child move to ``mu ± offset·σ``
    along its widest axis and both shrink by ``shrink``. A smaller one is **cloned** (the child sits
    ``jitter`` stds away). With ``preserve_mass`` both halves keep half the amplitude, so the summed
    amplitude (a splat's total weight in ``w_ij``) is unchanged.
    """

    preserves_mass: ClassVar[bool] = True

    max_per_head: int = Field(4, ge=1)
    min_grad: float = Field(0.0, ge=0, description="only splats whose mean ||dL/dmu|| exceeds this")
    split_ratio: float = Field(1.5, gt=0, description="split when size > split_ratio x the head's median size")
    shrink: float = Field(1.6, ge=1, description="a split divides both halves' stds by this")
    offset: float = Field(1.0, ge=0, description="split halves sit this many stds from the parent's center")
    jitter: float = Field(0.1, ge=0, description="a clone sits this many stds (random direction) away")
    preserve_mass: bool = Field(True, description="halve the amplitude of parent and child")

    def propose(self, bank: SplatBank, stats: SlotStats, *, generator: torch.Generator) -> Births:
        heads, targets, sources = hottest_into_dead(bank, stats, self.min_grad, self.max_per_head)
        if not heads:
            return Births.empty(bank)
        h = torch.tensor(heads, dtype=torch.long)
        src = torch.tensor(sources, dtype=torch.long)
        dev = bank.alive.device
        with torch.no_grad():
            size = _log_size(bank).cpu()
            alive_cpu = bank.alive.cpu()
            median = torch.stack([size[i][alive_cpu[i]].median() if bool(alive_cpu[i].any()) else size.new_zeros(())
                                  for i in range(bank.n_heads)])
            split = size[h, src] > median[h] + math.log(self.split_ratio)
            hd, sd = h.to(dev), src.to(dev)
            mu = bank.centers[hd, sd].detach().float().cpu()
            shape = bank.shape_params()[hd, sd].detach().float().cpu().clone()
            axis = _principal_axis(bank, hd, sd).cpu()
            std = _axis_std(bank, hd, sd).cpu()
            noise = torch.randn(mu.shape, generator=generator)
            shift = -math.log(2.0) if self.preserve_mass else 0.0
            log_amp = bank.log_amplitude[hd, sd].detach().float().cpu() + shift
            shrunk = _shrunk_shape(bank, hd, sd, self.shrink).cpu()
            sel = split.view(-1, *([1] * (shape.dim() - 1)))
            child_centers = torch.where(split.unsqueeze(-1), mu + self.offset * axis, mu + self.jitter * std * noise)
            parent_centers = torch.where(split.unsqueeze(-1), mu - self.offset * axis, mu)
            child_shape = torch.where(sel, shrunk, shape)
        return SplitBirths(
            heads=h, slots=torch.tensor(targets, dtype=torch.long), centers=child_centers, log_amplitude=log_amp,
            shape=child_shape, sources=src, source_log_amplitude=log_amp.clone(),
            source_centers=parent_centers, source_shape=child_shape.clone(),
        )


# ----------------------------------------------------------------------------- coverage gaps
class CoverageBirth(StrategyParams):
    """Seed new splats at poorly covered tokens (coverage gaps found by the statistics).

    Reads the worst covered queries/keys of the window (``WindowStats.gap_points``; a plain
    ``SlotStats`` carries none, and then nothing is born). A token is a gap when it is farther from every
    alive splat than ``radius`` stds, or than ``relative_radius`` times the distance of the window's
    median token (``WindowStats.typical_distance``; large splats cover everything in absolute terms,
    the relative test still finds the tokens covered far worse than the rest). Gaps are seeded worst
    first; each seed suppresses the candidates within
    ``min_separation`` of its own std, so one gap gets one splat. A seed has its head's median
    covariance times ``scale_factor`` and its head's median amplitude.
    """

    max_per_head: int = Field(4, ge=1)
    radius: float = Field(2.0, gt=0, description="a token farther than this many stds from every splat is a gap")
    relative_radius: float | None = Field(
        2.5, gt=1, description="... or farther than this multiple of the median token's distance (None: off)")
    min_separation: float = Field(2.0, ge=0, description="seeds stay this many (new) stds apart")
    scale_factor: float = Field(1.0, gt=0, description="a seed's std relative to its head's median std")

    def propose(self, bank: SplatBank, stats: SlotStats, *, generator: torch.Generator) -> Births:
        points = getattr(stats, "gap_points", None)
        dist = getattr(stats, "gap_dist", None)
        if points is None or dist is None or points.shape[1] == 0:
            return Births.empty(bank)
        points, dist = points.detach().float().cpu(), dist.detach().float().cpu()
        typical = getattr(stats, "typical_distance", None)
        threshold = torch.full((bank.n_heads,), self.radius)
        if typical is not None and self.relative_radius is not None:
            rel = self.relative_radius * typical.detach().float().cpu()
            threshold = torch.where(rel > 0, torch.minimum(threshold, rel), threshold)
        rows: dict[str, list] = {"h": [], "s": [], "c": [], "a": [], "shape": []}
        for head in range(bank.n_heads):
            dead = (~bank.alive[head].cpu()).nonzero().flatten().tolist()
            if not dead:
                continue
            log_amp, shape = _head_typical(bank, head)
            shape = shape + math.log(self.scale_factor) * (
                torch.eye(bank.head_dim) if bank.covariance == "full" else torch.ones_like(shape))
            lower = _row_scale_tril(bank, shape)
            valid = torch.isfinite(dist[head]) & (dist[head] > threshold[head]) & torch.isfinite(points[head]).all(-1)
            cand = points[head][valid]
            order = torch.argsort(dist[head][valid], descending=True, stable=True)
            chosen: list[Tensor] = []
            for idx in order.tolist():
                if len(chosen) >= min(len(dead), self.max_per_head):
                    break
                x = cand[idx]
                if chosen and self.min_separation > 0:
                    diff = torch.stack(chosen) - x
                    white = torch.linalg.solve_triangular(lower, diff.T, upper=False).T
                    if bool(((white.square().mean(-1)).sqrt() < self.min_separation).any()):
                        continue
                chosen.append(x)
            for slot, x in zip(dead, chosen, strict=False):
                rows["h"].append(head)
                rows["s"].append(slot)
                rows["c"].append(x)
                rows["a"].append(log_amp)
                rows["shape"].append(shape)
        if not rows["h"]:
            return Births.empty(bank)
        n = len(rows["h"])
        return Births(
            heads=torch.tensor(rows["h"], dtype=torch.long), slots=torch.tensor(rows["s"], dtype=torch.long),
            centers=torch.stack(rows["c"]), log_amplitude=torch.stack(rows["a"]).float(),
            shape=torch.stack(rows["shape"]).float(), sources=torch.full((n,), -1, dtype=torch.long),
            source_log_amplitude=torch.zeros(n),
        )


def _row_scale_tril(bank: SplatBank, shape: Tensor) -> Tensor:
    """Cholesky factor ``[d, d]`` of one covariance row (``log_scale`` or ``scale_tril_raw``)."""
    d = bank.head_dim
    if bank.covariance == "full":
        return torch.tril(shape, -1) + torch.diag_embed(shape.diagonal().exp())
    std = shape.exp().expand(d) if bank.covariance == "isotropic" else shape.exp()
    return torch.diag_embed(std)


# ----------------------------------------------------------------------------- MCMC relocation
class RelocateBirth(StrategyParams):
    """Relocate dead slots onto live ones, MCMC-style (as gsplat's MCMCStrategy relocates dead Gaussians).

    Every dead slot (at most ``max_per_head`` per head; all when None) receives a copy of an alive
    splat of its head drawn with probability proportional to ``weight`` (the window's mass, gradient
    or the amplitude). A source drawn ``c`` times shares its amplitude with its ``c`` copies (each gets
    ``a/(c+1)``), so relocation preserves the summed amplitude. Copies sit ``jitter`` stds away.
    """

    preserves_mass: ClassVar[bool] = True

    max_per_head: int | None = Field(None, ge=1, description="births per head per refine; None: every dead slot")
    weight: Literal["mass", "grad", "amplitude"] = "mass"
    jitter: float = Field(0.1, ge=0, description="a copy sits this many stds (random direction) away")

    def propose(self, bank: SplatBank, stats: SlotStats, *, generator: torch.Generator) -> Births:
        heads, targets, sources, shares = [], [], [], []
        amp = bank.log_amplitude.detach().float().cpu().exp()
        if self.weight == "mass" and stats.steps > 0:
            w_all = stats.mass.detach().float().cpu()
        elif self.weight == "grad" and stats.steps > 0:
            w_all = stats.grad_norm.detach().float().cpu()
        else:
            w_all = amp
        for head in range(bank.n_heads):
            alive = bank.alive[head].cpu()
            dead = (~alive).nonzero().flatten().tolist()
            if not dead or not bool(alive.any()):
                continue
            n = len(dead) if self.max_per_head is None else min(len(dead), self.max_per_head)
            w = w_all[head].clamp_min(0).nan_to_num(0.0).masked_fill(~alive, 0.0)
            if not bool(w.sum() > 0) or not bool(torch.isfinite(w.sum())):
                w = alive.float()
            drawn = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
            counts = torch.bincount(drawn, minlength=bank.capacity).float()
            heads += [head] * n
            targets += dead[:n]
            sources += drawn.tolist()
            shares += (-torch.log1p(counts[drawn])).tolist()
        if not heads:
            return Births.empty(bank)
        h = torch.tensor(heads, dtype=torch.long)
        src = torch.tensor(sources, dtype=torch.long)
        dev = bank.alive.device
        with torch.no_grad():
            hd, sd = h.to(dev), src.to(dev)
            mu = bank.centers[hd, sd].detach().float().cpu()
            std = _axis_std(bank, hd, sd).cpu()
            noise = torch.randn(mu.shape, generator=generator)
            log_amp = bank.log_amplitude[hd, sd].detach().float().cpu() + torch.tensor(shares)
            shape = bank.shape_params()[hd, sd].detach().float().cpu().clone()
        return Births(
            heads=h, slots=torch.tensor(targets, dtype=torch.long), centers=mu + self.jitter * std * noise,
            log_amplitude=log_amp, shape=shape, sources=src, source_log_amplitude=log_amp.clone(),
        )
