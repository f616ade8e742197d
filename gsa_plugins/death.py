"""Death policies: which alive slots to free."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.protocols import SlotStats
from gsa_core.registry import StrategyParams


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
