"""Death policies: which alive slots to free."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PrivateAttr, field_validator
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.protocols import SlotStats
from gsa_core.registry import StrategyParams, get_registry


class LowMassDeath(StrategyParams):
    """Kill slots whose windowed attention mass is below a fraction of their head's mean."""

    relative_threshold: float = Field(0.05, ge=0, description="fraction of the head's mean mass")

    def select(self, bank: SplatBank, stats: SlotStats) -> Tensor:
        alive = bank.alive
        if stats.steps == 0:
            return torch.zeros_like(alive)
        mass = stats.mass.to(alive.device).masked_fill(~alive, 0.0)
        mean = mass.sum(-1, keepdim=True) / alive.sum(-1, keepdim=True).clamp_min(1)
        return alive & (mass < self.relative_threshold * mean)


def bhattacharyya(bank: SplatBank, head: int) -> Tensor:
    """Pairwise Bhattacharyya distance between the Gaussians of one head, ``[K, K]`` (0 on the diagonal).

    ``D = ⅛ Δμᵀ Σ⁻¹ Δμ + ½ ln(det Σ / sqrt(det Σ₁ det Σ₂))`` with ``Σ = (Σ₁ + Σ₂)/2``: 0 for identical
    splats, ``⅛`` for two equal ones one std apart.
    """
    with torch.no_grad():
        mu = bank.centers[head].detach().double()
        diff = mu.unsqueeze(1) - mu.unsqueeze(0)  # [K, K, d]
        if bank.covariance == "full":
            cov = bank.covariance_matrix()[head].detach().double()
            logdet = torch.linalg.slogdet(cov).logabsdet
            avg = 0.5 * (cov.unsqueeze(1) + cov.unsqueeze(0))
            chol = torch.linalg.cholesky(avg)
            white = torch.linalg.solve_triangular(chol, diff.unsqueeze(-1), upper=False).squeeze(-1)
            avg_logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        else:
            var = bank.diag_scales()[head].detach().double().square()
            logdet = var.log().sum(-1)
            avg = 0.5 * (var.unsqueeze(1) + var.unsqueeze(0))
            white = diff / avg.sqrt()
            avg_logdet = avg.log().sum(-1)
        dist = 0.125 * white.square().sum(-1) + 0.5 * (avg_logdet - 0.5 * (logdet.unsqueeze(1) + logdet.unsqueeze(0)))
        return dist.clamp_min(0).float()


class RedundantDeath(StrategyParams):
    """Kill near-duplicate splats: of alive splats in a head closer than ``max_distance`` (Bhattacharyya
    distance), only the one carrying the most mass survives.

    Greedy and deterministic: slots are visited by decreasing windowed mass (ties: lower index first,
    and amplitude when no statistics are held yet); a slot dies when it duplicates a survivor.
    """

    max_distance: float = Field(0.02, ge=0, description="Bhattacharyya distance below which two splats duplicate")

    def select(self, bank: SplatBank, stats: SlotStats) -> Tensor:
        dead = torch.zeros_like(bank.alive)
        priority = stats.mass if stats.steps > 0 else bank.log_amplitude.detach()
        priority = priority.detach().float().cpu()
        for head in range(bank.n_heads):
            alive = bank.alive[head].cpu()
            if int(alive.sum()) < 2:
                continue
            dup = (bhattacharyya(bank, head).cpu() < self.max_distance) & alive.unsqueeze(0) & alive.unsqueeze(1)
            idx = alive.nonzero().flatten().tolist()
            idx.sort(key=lambda s: (-float(priority[head, s]), s))
            kept: list[int] = []
            for s in idx:
                if kept and bool(dup[s, kept].any()):
                    dead[head, s] = True
                else:
                    kept.append(s)
        return dead & bank.alive


class AmplitudeFloorDeath(StrategyParams):
    """Kill splats whose amplitude fell below a floor: an absolute log-amplitude, and/or a log-ratio to
    the largest amplitude in the head."""

    min_log_amplitude: float | None = Field(-10.0, description="kill when log a < this (None: no absolute floor)")
    max_log_ratio: float | None = Field(
        None, gt=0, description="kill when log(a_max / a) > this within the head (None: no relative floor)")

    def select(self, bank: SplatBank, stats: SlotStats) -> Tensor:
        alive = bank.alive
        log_a = bank.log_amplitude.detach().to(alive.device).float()
        dead = torch.zeros_like(alive)
        if self.min_log_amplitude is not None:
            dead |= log_a < self.min_log_amplitude
        if self.max_log_ratio is not None:
            top = log_a.masked_fill(~alive, float("-inf")).amax(-1, keepdim=True)
            dead |= (top - log_a) > self.max_log_ratio
        return dead & alive


class AnyDeath(StrategyParams):
    """Kill a slot when any of several death policies (given as ``{name, params}`` specs) chooses it."""

    policies: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"name": "low-mass"}],
        description="death specs, e.g. [{name: low-mass}, {name: redundant, params: {max_distance: 0.05}}]")

    _cache: list[Any] | None = PrivateAttr(default=None)

    @field_validator("policies")
    @classmethod
    def _specs(cls, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for spec in specs:
            if not isinstance(spec, dict) or set(spec) - {"name", "params"} or "name" not in spec:
                raise ValueError(f"each policy must be {{name, params}}, got {spec!r}")
            if spec["name"] == "any":
                raise ValueError("'any' cannot nest itself")
        return specs

    def _built(self) -> list[Any]:
        if self._cache is None:
            registry = get_registry()
            self._cache = [registry.build("death", s["name"], s.get("params") or {}) for s in self.policies]
        return self._cache

    def select(self, bank: SplatBank, stats: SlotStats) -> Tensor:
        dead = torch.zeros_like(bank.alive)
        for policy in self._built():
            dead |= policy.select(bank, stats).to(dead.device)
        return dead & bank.alive
