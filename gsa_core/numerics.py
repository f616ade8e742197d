"""Log-space reductions that stay finite, with finite gradients, when everything is masked.

``torch.logsumexp`` of an all ``-inf`` row is ``-inf`` with a NaN gradient; a fully masked query row
must instead give zeros with zero gradient (DESIGN.md section 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def finite_max(x: Tensor, dim: int, keepdim: bool = True) -> Tensor:
    """Detached max along ``dim`` with ``-inf`` (all masked) replaced by 0: a safe stabiliser."""
    m = x.detach().amax(dim, keepdim=keepdim)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def safe_logsumexp(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """``logsumexp`` that returns ``-inf`` with zero gradient for all ``-inf`` slices."""
    m = finite_max(x, dim, keepdim=True)
    s = torch.exp(x - m).sum(dim, keepdim=True)
    positive = s > 0
    out = torch.where(positive, torch.log(torch.where(positive, s, torch.ones_like(s))), NEG_INF) + m
    return out if keepdim else out.squeeze(dim)


def safe_softmax(logits: Tensor, dim: int) -> Tensor:
    """Softmax whose all ``-inf`` slices are zeros (not NaN), with finite gradients."""
    p = torch.exp(logits - finite_max(logits, dim))
    s = p.sum(dim, keepdim=True)
    return p / torch.where(s > 0, s, torch.ones_like(s))
