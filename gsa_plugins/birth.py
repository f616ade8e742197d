"""Birth policies: what to write into dead slots."""

from __future__ import annotations

import torch
from pydantic import Field

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


class CloneBirth(StrategyParams):
    """Clone the alive splats with the largest center gradients into dead slots."""

    max_per_head: int = Field(4, ge=1)
    min_grad: float = Field(0.0, ge=0, description="only splats whose mean ||dL/dmu|| exceeds this")
    jitter: float = Field(0.1, ge=0, description="offset of the copy, in units of the source's std")

    def propose(self, bank: SplatBank, stats: SlotStats, *, generator: torch.Generator) -> Births:
        heads, targets, sources = [], [], []
        for head in range(bank.n_heads):
            alive = bank.alive[head].cpu()
            dead = (~alive).nonzero().flatten().tolist()
            grad = stats.grad_norm[head].cpu().masked_fill(~alive, float("-inf"))
            order = torch.argsort(grad, descending=True, stable=True).tolist()
            hot = [s for s in order if alive[s] and grad[s] > self.min_grad]
            n = min(len(dead), len(hot), self.max_per_head)
            heads += [head] * n
            targets += dead[:n]
            sources += hot[:n]
        return clone_births(bank, heads, targets, sources, self.jitter, generator)
