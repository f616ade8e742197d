"""Attention over what a cache layer keeps: a key window, a kernel state, or both.

Queries are the last ``n`` tokens; keys are the ``m >= n`` most recent tokens (the cached ones, then
the queries' own), so query ``i`` sits at key index ``m - n + i``. Windows count key positions
(padding included), exactly as the full forward does. Torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.numerics import NEG_INF, safe_softmax
from gsa_plugins.backends.dense import pair_log_weights
from gsa_plugins.backends.kernel import KernelState


def visible(n_q: int, valid: Tensor, window: int | None) -> Tensor:
    """``[B, n_q, m]`` bool: causal (queries are the last ``n_q`` keys), within ``window``, real key."""
    m = valid.shape[-1]
    q_pos = torch.arange(m - n_q, m, device=valid.device).unsqueeze(1)
    k_pos = torch.arange(m, device=valid.device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    return allowed.unsqueeze(0) & valid[:, None, :]


def exact_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, scaling: float,
                    window: int | None) -> Tensor:
    """Softmax attention in fp32 (as GPT-Neo computes it): ``q [B, H, n, d]``, ``k, v [B, H, m, ·]``,
    ``valid [B, m]`` -> ``[B, H, n, d_v]`` in ``v``'s dtype; a query that sees no key returns zeros."""
    n = q.shape[-2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    if scaling != 1.0:
        scores = scores * scaling
    allowed = visible(n, valid, window).unsqueeze(1)
    probs = safe_softmax(scores.masked_fill(~allowed, NEG_INF), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def hybrid_with_state(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, state: KernelState, bank: SplatBank, *,
                      scaling: float, scale: float, window: int) -> Tensor:
    """Exact softmax over each query's last ``window`` keys, GSA for the older cached keys and for the
    state's keys (all older still), under one normaliser.

    The state enters as ``K`` pseudo-keys per head: splat ``s`` has log-weight ``lq_s + z_s`` and value
    ``M_s`` (its normalised memory), which is exactly ``Σ_{j in state} w_ij v_j`` up to the common
    normaliser. ``q, k`` are in the host's space; ``scale`` maps them to GSA space.
    Returns ``[B, H, n, d_v]`` in ``v``'s dtype.
    """
    n = q.shape[-2]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    lq = bank.log_features(qf * scale if scale != 1.0 else qf)
    lk = bank.log_features(kf * scale if scale != 1.0 else kf)
    exact = torch.matmul(qf, kf.transpose(-1, -2))
    if scaling != 1.0:
        exact = exact * scaling
    in_window = visible(n, torch.ones_like(valid), window).unsqueeze(1)
    scores = torch.where(in_window, exact, pair_log_weights(lq, lk))
    scores = scores.masked_fill(~visible(n, valid, None).unsqueeze(1), NEG_INF)
    past = lq + state.z.to(dtype).unsqueeze(-2)  # [B, H, n, K]
    probs = safe_softmax(torch.cat((scores, past), dim=-1), dim=-1)
    m = k.shape[-2]
    out = torch.matmul(probs[..., :m], vf) + torch.matmul(probs[..., m:], state.M.to(dtype))
    return out.to(v.dtype)


__all__ = ["exact_attention", "hybrid_with_state", "visible"]
