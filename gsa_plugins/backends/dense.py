"""``dense``: the exact log-space reference (``gsa_core.reference``) as a backend: ``O(n^2 K)`` time, any mask.

Queries are processed in blocks so the ``[block, n_k, K]`` pair tensor stays within a memory budget.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.flops import feature_flops, visible_pairs
from gsa_core.masks import MASK_KINDS, MaskSpec
from gsa_core.reference import BLOCK_ELEMENTS, dense_attention, pair_log_weights
from gsa_core.registry import StrategyParams


class DenseParams(StrategyParams):
    block_elements: int = Field(BLOCK_ELEMENTS, ge=1, description="max elements of one [block, n_k, K] pair tensor")


class DenseBackend:
    """Exact GSA attention; the reference every other backend is tested against."""

    name = "dense"
    supported_masks = frozenset(MASK_KINDS)

    def __init__(self, params: DenseParams | None = None) -> None:
        self.params = params or DenseParams()

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        return dense_attention(q, k, v, bank, mask, block_elements=self.params.block_elements), {"backend": self.name}

    def flops(self, batch: int, heads: int, n_q: int, n_k: int, head_dim: int, value_dim: int, causal: bool,
              bank: SplatBank) -> float:
        """Features of q and k, the ``[n_q, n_k, K]`` log-sum-exp (an add and an accumulate per term), ``P @ V``
        over the visible pairs (all pairs are computed, only the visible ones count for ``P @ V``)."""
        pairs = visible_pairs(n_q, n_k, causal)
        k = bank.capacity
        return float(batch * heads * (feature_flops(bank, n_q + n_k) + 2 * n_q * n_k * k + 2 * pairs * value_dim))


__all__ = ["DenseBackend", "DenseParams", "pair_log_weights"]
