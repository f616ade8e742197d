"""Adaptation metrics for loggers and the visualisation: plain floats and small lists, JSON-ready.

Per refine the controller records a :class:`RefineRecord` (births, deaths, alive per head); at any time
:func:`bank_metrics` summarises a bank from its window statistics: alive count, mass entropy and
coverage. :func:`flat_metrics` turns the controller's state into ``{"adapt/...": float}`` for a logger.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.protocols import SlotStats


def mass_entropy(mass: Tensor, alive: Tensor) -> Tensor:
    """Normalised entropy of each head's mass over its alive slots, ``[H]`` in ``[0, 1]``.

    1: every alive slot carries the same mass; 0: one slot carries everything (also for one alive slot).
    """
    m = mass.float().to(alive.device).masked_fill(~alive, 0.0).clamp_min(0)
    total = m.sum(-1, keepdim=True)
    p = m / total.clamp_min(1e-30)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    n = alive.sum(-1).float()
    return torch.where(n > 1, ent / n.clamp_min(2).log(), torch.zeros_like(ent))


def effective_slots(mass: Tensor, alive: Tensor) -> Tensor:
    """``exp(entropy)`` of each head's mass distribution: how many slots effectively carry it, ``[H]``."""
    m = mass.float().to(alive.device).masked_fill(~alive, 0.0).clamp_min(0)
    p = m / m.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1))


@dataclass
class RefineRecord:
    """What one refine did to one bank."""

    step: int
    bank: str
    births: int
    deaths: int
    alive: int
    births_per_head: list[int] = field(default_factory=list)
    deaths_per_head: list[int] = field(default_factory=list)
    alive_per_head: list[int] = field(default_factory=list)
    reason: str = "schedule"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def bank_metrics(bank: SplatBank, stats: SlotStats | None = None) -> dict[str, Any]:
    """Alive count (total and per head), mass entropy and effective slots (from the window's mass),
    and coverage (when the statistics carry it)."""
    alive = bank.alive
    out: dict[str, Any] = {
        "alive": int(alive.sum()),
        "alive_per_head": [int(v) for v in alive.sum(-1)],
        "capacity": bank.n_heads * bank.capacity,
    }
    if stats is not None and stats.steps > 0:
        ent = mass_entropy(stats.mass, alive)
        out["mass_entropy"] = float(ent.mean())
        out["mass_entropy_per_head"] = [float(v) for v in ent]
        out["effective_slots"] = float(effective_slots(stats.mass, alive).mean())
        out["mean_grad_norm"] = float(stats.grad_norm.to(alive.device)[alive].mean()) if alive.any() else 0.0
        coverage = getattr(stats, "coverage", None)
        if coverage is not None:
            out["coverage"] = float(coverage.mean())
            out["coverage_per_head"] = [float(v) for v in coverage]
    return out


def summarise_records(records: list[RefineRecord]) -> dict[str, Any]:
    """Totals over refines: how many refines, births and deaths, and per refine (for a plot)."""
    steps = sorted({r.step for r in records})
    births = [sum(r.births for r in records if r.step == s) for s in steps]
    deaths = [sum(r.deaths for r in records if r.step == s) for s in steps]
    return {
        "refines": len(steps),
        "births": sum(births),
        "deaths": sum(deaths),
        "refine_steps": steps,
        "births_per_refine": births,
        "deaths_per_refine": deaths,
    }


__all__ = ["RefineRecord", "bank_metrics", "effective_slots", "mass_entropy", "summarise_records"]
