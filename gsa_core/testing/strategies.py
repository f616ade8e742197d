"""Hypothesis strategies for banks, inputs and masks, shared by every conformance check."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

from gsa_core.bank import COVARIANCE_KINDS, SplatBank
from gsa_core.protocols import SlotStats


@dataclass(frozen=True)
class BankSpec:
    """A small bank drawn by hypothesis; ``make()`` builds it reproducibly from ``seed``."""

    n_heads: int
    head_dim: int
    capacity: int
    covariance: str
    seed: int
    center_scale: float = 1.0
    log_scale_range: tuple[float, float] = (-0.5, 0.5)
    dead_fraction: float = 0.0
    log_normalizer: bool = False

    def make(self) -> SplatBank:
        bank = SplatBank(self.n_heads, self.head_dim, self.capacity, self.covariance,  # type: ignore[arg-type]
                         log_normalizer=self.log_normalizer)
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = self.log_scale_range
        with torch.no_grad():
            bank.centers.copy_(torch.randn(bank.centers.shape, generator=g) * self.center_scale)
            bank.log_amplitude.copy_(torch.randn(bank.log_amplitude.shape, generator=g) * 0.5)
            shape = bank.shape_params()
            if bank.covariance == "full":
                raw = torch.randn(shape.shape, generator=g) * 0.2
                diag = lo + (hi - lo) * torch.rand(shape.shape[:-1], generator=g)
                raw.diagonal(dim1=-2, dim2=-1).copy_(diag)
                shape.copy_(raw)
            else:
                shape.copy_(lo + (hi - lo) * torch.rand(shape.shape, generator=g))
            if self.dead_fraction > 0:
                dead = torch.rand(bank.alive.shape, generator=g) < self.dead_fraction
                dead[:, 0] = False  # keep at least one slot alive per head
                bank.alive.copy_(~dead)
        return bank


@st.composite
def bank_specs(
    draw: st.DrawFn,
    *,
    max_heads: int = 3,
    head_dims: tuple[int, ...] = (2, 4, 8),
    max_capacity: int = 12,
    covariances: tuple[str, ...] = COVARIANCE_KINDS,
    allow_dead: bool = True,
) -> BankSpec:
    return BankSpec(
        n_heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.sampled_from(head_dims)),
        capacity=draw(st.integers(1, max_capacity)),
        covariance=draw(st.sampled_from(covariances)),
        seed=draw(st.integers(0, 2**31 - 1)),
        dead_fraction=draw(st.sampled_from((0.0, 0.3, 0.7))) if allow_dead else 0.0,
        log_normalizer=draw(st.booleans()),
    )


def random_qkv(
    bank: SplatBank, batch: int, n_q: int, n_k: int, value_dim: int, seed: int, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values for ``bank``, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    h, d = bank.n_heads, bank.head_dim
    q = torch.randn(batch, h, n_q, d, generator=g) * scale
    k = torch.randn(batch, h, n_k, d, generator=g) * scale
    v = torch.randn(batch, h, n_k, value_dim, generator=g)
    return q, k, v


def padding_mask(batch: int, length: int, seed: int, *, side: str = "right", min_real: int = 1) -> Tensor:
    """``bool [batch, length]`` with at least ``min_real`` real tokens per row."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(min(min_real, length), length + 1, (batch,), generator=g)
    pos = torch.arange(length).unsqueeze(0)
    return pos < real.unsqueeze(1) if side == "right" else pos >= (length - real).unsqueeze(1)


def random_stats(bank: SplatBank, seed: int, steps: int = 10) -> SlotStats:
    """Plausible windowed statistics: positive mass and gradients on alive slots, zeros on dead ones."""
    g = torch.Generator().manual_seed(seed)
    alive = bank.alive.float()
    mass = torch.rand(bank.alive.shape, generator=g).pow(3) * alive
    grad = torch.rand(bank.alive.shape, generator=g) * alive
    hits = torch.randint(0, 20, bank.alive.shape, generator=g).float() * alive
    return SlotStats(mass=mass, grad_norm=grad, hits=hits, steps=steps)
