"""The built-in position extensions (kind ``positions``): ``interpolate``, ``tile`` and ``none``.

Each turns a learned absolute position table ``[P, d]`` into ``[N, d]`` rows for ``N >= P``
(:class:`gsa_core.protocols.PositionExtension`); the adapter says where a model keeps its table and
``gsa_plugins.adapters.extend_positions`` swaps the result in. Why these three:

- ``interpolate``: Position Interpolation (Chen et al. 2023) for a learned table: position ``m`` of the
  longer context reads the table at ``m * (P - 1) / (N - 1)`` (endpoints kept) or ``m * P / N`` (the
  paper's scaling), linearly between the two nearest trained rows. Every position stays inside the
  trained range, so the model sees no unseen embedding; nearby tokens get closer positions, which
  continued training at the longer context (``gsa train --context N --resume-from MODEL``) adapts to.
- ``tile``: copies of the trained table one after another, as Longformer initialised its 4,096
  positions from RoBERTa's 512: the first ``P`` positions are exactly the trained ones, so short inputs
  behave as before, and local order is preserved everywhere.
- ``none``: no extension; asking for more rows than the table has is the one clear error naming the
  limit and the other strategies.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.positions import PositionLimitError, check_table, registered_strategies
from gsa_core.registry import StrategyParams


class Interpolate(StrategyParams):
    """Position interpolation: the longer context's positions read the trained table at fractional positions."""

    name: ClassVar[str] = "interpolate"
    align: Literal["endpoints", "scale"] = Field(
        "endpoints", description="endpoints: position m reads m*(P-1)/(N-1) (first and last rows kept); "
                                 "scale: m*P/N (Chen et al.'s scaling; past P-1 the last row)",
    )

    def extend(self, table: Tensor, n_positions: int) -> Tensor:
        rows = check_table(table, n_positions)
        if n_positions == rows:
            return table.clone()
        steps = torch.arange(n_positions, dtype=torch.float64, device=table.device)
        # integer products before the division: whole source positions come out exact, so those rows are copies
        source = steps * (rows - 1) / (n_positions - 1) if self.align == "endpoints" else steps * rows / n_positions
        low = source.floor().long().clamp(max=rows - 1)
        high = (low + 1).clamp(max=rows - 1)
        weight = (source - low).clamp(max=1.0).unsqueeze(-1)
        dtype = torch.promote_types(table.dtype, torch.float32)
        t = table.detach().to(dtype)
        out = t[low] * (1 - weight).to(dtype) + t[high] * weight.to(dtype)
        return out.to(table.dtype)


class Tile(StrategyParams):
    """Copies of the trained table one after another (Longformer): the first P positions are the trained ones."""

    name: ClassVar[str] = "tile"

    def extend(self, table: Tensor, n_positions: int) -> Tensor:
        rows = check_table(table, n_positions)
        index = torch.arange(n_positions, device=table.device) % rows
        return table.detach()[index].clone()


class NoExtension(StrategyParams):
    """No extension: the table as trained; past its last row, one error naming the limit and the strategies."""

    name: ClassVar[str] = "none"

    def extend(self, table: Tensor, n_positions: int) -> Tensor:
        rows = check_table(table, n_positions)
        if n_positions > rows:
            raise PositionLimitError(n_positions, rows, registered_strategies(),
                                     what=f"--max-positions {n_positions} with 'none' (no extension)")
        return table.clone()


__all__ = ["Interpolate", "NoExtension", "Tile"]
