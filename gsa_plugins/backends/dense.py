"""The exact log-space reference: ``O(n^2 K)`` time, any mask.

Queries are processed in blocks so the ``[block, n_k, K]`` pair tensor stays within a memory budget.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.masks import MASK_KINDS, MaskSpec
from gsa_core.numerics import safe_logsumexp, safe_softmax
from gsa_core.registry import StrategyParams


class DenseParams(StrategyParams):
    block_elements: int = Field(1 << 24, ge=1, description="max elements of one [block, n_k, K] pair tensor")


def pair_log_weights(lq: Tensor, lk: Tensor) -> Tensor:
    """``log w_ij = logsumexp_s(lq_is + lk_js)``: ``[..., n_q, K] x [..., n_k, K] -> [..., n_q, n_k]``."""
    return safe_logsumexp(lq.unsqueeze(-2) + lk.unsqueeze(-3), dim=-1)


class DenseBackend:
    """Exact GSA attention; the reference every other backend is tested against."""

    name = "dense"
    supported_masks = frozenset(MASK_KINDS)

    def __init__(self, params: DenseParams | None = None) -> None:
        self.params = params or DenseParams()

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        batch, heads, n_q, _ = q.shape
        n_k = k.shape[-2]
        mask.check_shapes(batch, n_q, n_k)
        lq, lk = bank.log_features(q), bank.log_features(k)
        allowed = mask.allowed(n_q, n_k, device=q.device)
        vf = v.to(lq.dtype)
        per_row = max(1, n_k * bank.capacity * heads * batch)
        block = max(1, min(n_q, self.params.block_elements // per_row))
        outs = []
        for start in range(0, n_q, block):
            stop = min(n_q, start + block)
            logw = pair_log_weights(lq[..., start:stop, :], lk)
            allow = allowed[..., start:stop, :] if allowed.shape[-2] > 1 else allowed
            logw = logw.masked_fill(~allow, float("-inf"))
            outs.append(safe_softmax(logw, dim=-1) @ vf)
        out = torch.cat(outs, dim=-2)
        if mask.query_padding is not None:
            out = out * mask.query_padding[:, None, :, None].to(out.dtype)
        return out.to(v.dtype), {"backend": self.name}
