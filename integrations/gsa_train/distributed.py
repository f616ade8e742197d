"""Data parallelism read from ``torchrun``'s environment; the identity when not distributed.

Why an explicit all-reduce rather than ``DistributedDataParallel``: the training loop, the
distillation loop and the adaptation controller all need the same three things (shard a global batch,
average gradients, agree on scalars), and one flat all-reduce after ``backward`` gives gradients equal
to the single-process full-batch gradient up to float rounding when every rank holds the same number
of loss terms (packed blocks of equal length do). Collectives go through
:class:`gsa_core.adaptation.distributed.Synchronizer`, the same helper that keeps splat banks identical.

Usage::

    with DataParallel.from_env() as dp:          # init gloo when WORLD_SIZE > 1
        rows = dp.shard(global_batch)            # this rank's rows
        loss = model(rows).loss
        loss.backward()
        dp.average_gradients(model)              # now equal on every rank
        optimizer.step()
        if dp.is_main: save(...)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gsa_core.adaptation.distributed import Synchronizer

T = TypeVar("T")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


@dataclass
class DataParallel:
    """This process's place in a data-parallel run (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, backend: str = "gloo",
                 timeout_s: float = 300.0) -> DataParallel:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``) and init the process group.

        With ``WORLD_SIZE`` unset or 1 nothing is initialised. An already initialised default group is
        reused (and not destroyed by :meth:`close`).
        """
        env = os.environ if env is None else env
        world = _env_int(env, "WORLD_SIZE", 1)
        rank = _env_int(env, "RANK", 0)
        local = _env_int(env, "LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
        if world == 1:
            return cls()
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=False)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise ValueError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun "
                                 "(e.g. torchrun --nproc_per_node 2 -m gsa_cli.main train ...)")
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, local, owns_group=True)

    # ------------------------------------------------------------------ state
    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sync(self) -> Synchronizer:
        return Synchronizer(enabled=self.active)

    # ------------------------------------------------------------------ data
    def shard_range(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's rows in a global batch of ``n`` rows (contiguous, equal sizes)."""
        if n % self.world_size:
            raise ValueError(f"global batch size {n} is not divisible by the number of processes "
                             f"{self.world_size}; choose a multiple of {self.world_size}")
        per = n // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def shard(self, batch: T) -> T:
        """This rank's rows of a global batch: a tensor, a list/tuple, or a dict of them (split on dim 0)."""
        if isinstance(batch, Mapping):
            return type(batch)({k: self.shard(v) for k, v in batch.items()})  # type: ignore[return-value]
        if isinstance(batch, Tensor | list | tuple):
            start, stop = self.shard_range(len(batch))
            return batch[start:stop]  # type: ignore[return-value]
        raise TypeError(f"cannot shard a {type(batch).__name__}: use a tensor, list, tuple or dict of them")

    # ------------------------------------------------------------------ collectives
    def average_gradients(self, params: nn.Module | Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its mean over ranks (one flat all-reduce); a missing gradient counts as 0."""
        if not self.active:
            return
        plist = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
        for p in plist:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = {str(i): p.grad for i, p in enumerate(plist)}
        averaged = self.sync.all_reduce_dict_mean(grads)
        for i, p in enumerate(plist):
            p.grad.copy_(averaged[str(i)])

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (a safety net for identical starts)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                buf = t.detach().cpu().clone().contiguous()
                dist.broadcast(buf, src=0)
                t.copy_(buf.to(t.device))

    def mean(self, value: float | Tensor) -> float:
        """The mean of a scalar over ranks (the value itself when not distributed)."""
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(1)
        return float(self.sync.all_reduce_mean(t)[0])

    def sum(self, value: float | Tensor) -> float:
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(1)
        return float(self.sync.all_reduce_sum(t)[0])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["DataParallel"]
