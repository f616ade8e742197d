"""The numerics every attention path shares: safe log-space reductions, the input contract, one blocked loop.

- ``torch.logsumexp`` of an all ``-inf`` row is ``-inf`` with a NaN gradient; a fully masked query row
  must instead give zeros with zero gradient (DESIGN.md section 1): :func:`safe_logsumexp`,
  :func:`safe_softmax`;
- NaN/Inf inputs are refused before any output, the same way in every backend: :func:`check_finite`;
- dense GSA, exact softmax and hybrid attention are one "score, mask, softmax, @v" loop over query
  blocks with different scores: :func:`blocked_softmax_attention`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gsa_core.errors import NonFiniteInputError

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


def safe_lse_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(safe_logsumexp, safe_softmax)`` over the last dim with one exponential (a state's readout needs both)."""
    m = finite_max(logits, -1)
    e = torch.exp(logits - m)
    s = e.sum(-1, keepdim=True)
    pos = s > 0
    s_safe = torch.where(pos, s, torch.ones_like(s))
    lse = torch.where(pos, torch.log(s_safe) + m, NEG_INF).squeeze(-1)
    return lse, e / s_safe


def safe_softmax(logits: Tensor, dim: int) -> Tensor:
    """Softmax whose all ``-inf`` slices are zeros (not NaN), with finite gradients."""
    p = torch.exp(logits - finite_max(logits, dim))
    s = p.sum(dim, keepdim=True)
    return p / torch.where(s > 0, s, torch.ones_like(s))


# ----------------------------------------------------------------------------- input contract
#: Below this many elements in all, the inputs are checked in one pass over their concatenation (decode steps).
_SMALL_CHECK = 1 << 14


def check_finite(**tensors: Tensor | None) -> None:
    """Raise :class:`~gsa_core.errors.NonFiniteInputError` naming the first input with a NaN or Inf.

    The one NaN/Inf behaviour of every backend (DESIGN.md section 2), checked before any output: one
    ``isfinite().all()`` per tensor (one over all of them when they are small, as in a decode step).
    """
    present = [(name, t) for name, t in tensors.items() if t is not None and t.numel()]
    if not present:
        return
    if len(present) > 1 and sum(t.numel() for _, t in present) <= _SMALL_CHECK:
        ok = bool(torch.isfinite(torch.cat([t.reshape(-1) for _, t in present])).all())
    else:  # a finite sum proves every element finite (NaN and ±inf propagate through +): one cheap pass;
        # only a sum that overflows (or a real NaN/Inf) takes the exact isfinite pass (~10x slower on CPU)
        ok = all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for _, t in present)
    if ok:
        return
    for name, t in present:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise NonFiniteInputError(name, float(t.detach()[index]), index)


# ----------------------------------------------------------------------------- blocked attention
def rows_per_block(n_q: int, per_row: int, budget: int) -> int:
    """Query rows per block so that one block's ``rows x per_row`` working set stays within ``budget``."""
    return max(1, min(max(n_q, 1), budget // max(1, per_row)))


def blocked_softmax_attention(
    logits: Callable[[slice], Tensor],
    v: Tensor,
    n_q: int,
    *,
    block: int,
    allowed: Tensor | None = None,
    summary: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``softmax(mask(logits)) @ v`` over query rows in blocks: the one "score, mask, softmax, @v" loop.

    Dense GSA, exact softmax and hybrid attention differ only in their logits, so they share this loop
    (and its empty-input and all-masked-row behaviour). ``logits(rows)`` gives ``[B, H, len(rows), n_k]``
    for a slice of query rows; ``allowed`` (bool, broadcastable to ``[B, H, n_q, n_k]``) hides keys;
    ``v [B, H, n_k, d_v]``. ``summary = (out [B, H, n_q, d_v], lse [B, H, n_q])`` is one more key per
    query under the same normaliser: attention already summarised elsewhere (a recurrent state's
    ``readout``), with log-weight ``lse`` and value ``out``. Probabilities are cast to ``v``'s dtype
    before the product (as Hugging Face's eager attention does). A row that sees nothing gives zeros.
    Returns ``[B, H, n_q, d_v]`` in ``v``'s dtype (the summary's dtype when it is wider).
    """
    batch, heads, n_k, dv = v.shape
    if n_q == 0 or (n_k == 0 and summary is None):
        return v.new_zeros(batch, heads, n_q, dv)
    outs = []
    for start in range(0, n_q, block):
        rows = slice(start, min(n_q, start + block))
        scores = logits(rows)
        if allowed is not None:
            scores = scores.masked_fill(~(allowed[..., rows, :] if allowed.shape[-2] > 1 else allowed), NEG_INF)
        if summary is None:
            outs.append(safe_softmax(scores, dim=-1).to(v.dtype) @ v)
            continue
        s_out, s_lse = summary[0][..., rows, :], summary[1][..., rows]
        probs = safe_softmax(torch.cat((scores, s_lse.unsqueeze(-1).to(scores.dtype)), dim=-1), dim=-1)
        outs.append(probs[..., :n_k].to(v.dtype) @ v + probs[..., n_k:].to(s_out.dtype) * s_out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
