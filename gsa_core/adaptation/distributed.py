"""Same decisions on every rank under ``torch.distributed``.

Each rank accumulates its own statistics (its own tokens). Before a decision the controller reduces
them across ranks: window sums are all-reduced and averaged, coverage-gap candidates are all-gathered
(concatenated in rank order), the shift detector's window sums are all-reduced. Policies then read
identical statistics, the banks are identical (DDP keeps parameters in sync, and every slot edit is
a function of identical inputs), and the birth generator is seeded identically on every rank
(:func:`decision_seed`), so every rank takes the same decisions without broadcasting any parameter.
Without an initialised process group every function here is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class Synchronizer:
    """Collective helpers bound to a process group (``None``: the default group, if initialised)."""

    def __init__(self, group: Any = None, enabled: bool | None = None) -> None:
        self.group = group
        self._enabled = enabled

    @property
    def active(self) -> bool:
        if self._enabled is False:
            return False
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    @property
    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.group)

    def _backend_device(self, t: Tensor) -> torch.device:
        backend = dist.get_backend(self.group)
        return torch.device("cpu") if backend == "gloo" else t.device

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks (a new tensor; ``t`` itself is untouched)."""
        if not self.active:
            return t
        dev = self._backend_device(t)
        buf = t.detach().to(dev).clone().contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf.to(t.device)

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        if not self.active:
            return t
        return self.all_reduce_sum(t) / self.world_size

    def all_reduce_dict_mean(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean over ranks of every tensor in one flat collective."""
        if not self.active:
            return tensors
        names = list(tensors)
        flat = torch.cat([tensors[n].detach().float().flatten() for n in names])
        flat = self.all_reduce_mean(flat)
        out, at = {}, 0
        for n in names:
            t = tensors[n]
            out[n] = flat[at:at + t.numel()].reshape(t.shape).to(t.dtype)
            at += t.numel()
        return out

    def all_gather_cat(self, t: Tensor, dim: int) -> Tensor:
        """``t`` from every rank concatenated along ``dim`` in rank order (same shape on every rank)."""
        if not self.active:
            return t
        dev = self._backend_device(t)
        src = t.detach().to(dev).contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(parts, src, group=self.group)
        return torch.cat(parts, dim=dim).to(t.device)


def decision_seed(seed: int, refine_index: int, bank_index: int) -> int:
    """The birth generator's seed for one bank at one refine: identical on every rank."""
    return (int(seed) * 1_000_003 + int(refine_index) * 7_919 + int(bank_index) * 104_729) % (2**63 - 1)


__all__ = ["Synchronizer", "decision_seed"]
