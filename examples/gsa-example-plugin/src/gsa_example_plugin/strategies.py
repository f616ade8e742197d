"""Two small strategies: each is a pydantic model, so its fields are its validated params."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pydantic import Field

from gsa_core import Births, SlotStats, SplatBank, StrategyParams


class CentroidSeedBirth(StrategyParams):
    """Seed dead slots at the mass-weighted centroid of each head's alive splats, slightly jittered."""

    per_head: int = Field(1, ge=1, description="births per head per refine")
    jitter: float = Field(0.05, ge=0)

    def propose(self, bank: SplatBank, stats: SlotStats, *, generator: torch.Generator) -> Births:
        heads, slots, centers, shapes, amps = [], [], [], [], []
        with torch.no_grad():
            for h in range(bank.n_heads):
                alive = bank.alive[h]
                dead = (~alive).nonzero().flatten()[: self.per_head]
                if len(dead) == 0 or not alive.any():
                    continue
                weight = (stats.mass[h] * alive).clamp_min(0) + alive.float() * 1e-6
                weight = weight / weight.sum()
                centroid = (weight.unsqueeze(-1) * bank.centers[h].float()).sum(0)
                widest = int(torch.argmax(weight))
                for slot in dead.tolist():
                    noise = torch.randn(bank.head_dim, generator=generator) * self.jitter
                    heads.append(h)
                    slots.append(slot)
                    centers.append(centroid + noise)
                    shapes.append(bank.shape_params()[h, widest].float().clone())
                    amps.append(-math.log(bank.capacity))
        if not heads:
            return Births.empty(bank)
        n = len(heads)
        return Births(
            heads=torch.tensor(heads), slots=torch.tensor(slots), centers=torch.stack(centers),
            log_amplitude=torch.tensor(amps), shape=torch.stack(shapes),
            sources=torch.full((n,), -1, dtype=torch.long), source_log_amplitude=torch.zeros(n),
        )


class GeometricScheduler(StrategyParams):
    """Refine at steps first, first*ratio, first*ratio^2, ...: often early, rarely later."""

    first: int = Field(100, ge=1)
    ratio: float = Field(2.0, gt=1.0)

    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool:
        if step < self.first:
            return False
        exponent = math.log(step / self.first, self.ratio)
        k = round(exponent)
        return round(self.first * self.ratio**k) == step
