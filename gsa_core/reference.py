"""The naive reference of GSA attention: the formula of DESIGN.md section 1, in log space, any mask.

``O(n_q·n_k·K)`` time; queries in blocks so one ``[block, n_k, K]`` pair tensor stays within a budget.
The ``dense`` backend serves it (in fp32); :class:`ReferenceBackend` runs it in float64, the yardstick
the conformance kit holds every backend to (as flash-linear-attention keeps a ``naive.py`` beside each
fast path). One implementation: both call :func:`dense_attention`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.masks import MASK_KINDS, MaskSpec
from gsa_core.numerics import blocked_softmax_attention, check_finite, rows_per_block, safe_logsumexp

#: Most elements of one ``[block, n_k, K]`` pair tensor (times batch and heads).
BLOCK_ELEMENTS = 1 << 24


def pair_log_weights(lq: Tensor, lk: Tensor) -> Tensor:
    """``log w_ij = logsumexp_s(lq_is + lk_js)``: ``[..., n_q, K] x [..., n_k, K] -> [..., n_q, n_k]``."""
    return safe_logsumexp(lq.unsqueeze(-2) + lk.unsqueeze(-3), dim=-1)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec, *,
                    block_elements: int = BLOCK_ELEMENTS) -> Tensor:
    """Exact GSA attention for any mask, in the compute dtype of ``q`` (fp32; fp64 for fp64 inputs).

    ``q [B, H, n_q, d]``, ``k [B, H, n_k, d]``, ``v [B, H, n_k, d_v]`` -> ``[B, H, n_q, d_v]`` in ``v``'s
    dtype. Checks the inputs (finite, mask shapes) first; empty sequences give zeros.
    """
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[-2]
    mask.check_shapes(batch, n_q, n_k)
    check_finite(q=q, k=k, v=v)
    lq, lk = bank.log_features(q), bank.log_features(k)
    block = rows_per_block(n_q, n_k * bank.capacity * heads * batch, block_elements)
    out = blocked_softmax_attention(lambda rows: pair_log_weights(lq[..., rows, :], lk), v.to(lq.dtype), n_q,
                                    block=block, allowed=mask.allowed(n_q, n_k, device=q.device))
    if mask.query_padding is not None:
        out = out * mask.query_padding[:, None, :, None].to(out.dtype)
    return out.to(v.dtype)


class ReferenceBackend:
    """:func:`dense_attention` in float64 (outputs and gradients flow back in the inputs' dtypes)."""

    name = "reference"
    supported_masks = frozenset(MASK_KINDS)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank,
                mask: MaskSpec) -> tuple[Tensor, dict[str, Any]]:
        out = dense_attention(q.double(), k.double(), v.double(), bank, mask)
        return out.to(v.dtype), {"backend": self.name}


__all__ = ["BLOCK_ELEMENTS", "ReferenceBackend", "dense_attention", "pair_log_weights"]
