"""The ``kernel`` backend's causal chunked forward written with autograd: the reference beside the fast path.

:func:`causal_chunks_reference` is the arithmetic of :mod:`gsa_plugins.backends.kernel_chunked` (the same
stabilisers, the same exact recomputation of dominated rows) in differentiable tensor ops, with the chunk
recurrence in closed form; autograd derives its gradient. The fast path's hand-derived backward is
tested against it and against ``dense`` (flash-linear-attention keeps a ``naive.py`` beside each op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsa_core.numerics import NEG_INF, safe_logsumexp
from gsa_plugins.backends.kernel_chunked import MIN_ROW_TOTAL, exact_causal_rows


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def causal_chunks_reference(
    lq: Tensor, lk: Tensor, v: Tensor, z: Tensor, M: Tensor, chunk: int, seen: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention over ``S = nc·chunk`` tokens starting from state ``(z, M)``; differentiable.

    ``lq, lk [B, H, S, K]`` (masked keys already ``-inf``), ``v [B, H, S, dv]``, ``z [B, H, K]``,
    ``M [B, H, K, dv]``, ``seen [B·H, S]`` (whether a row has any visible key). Returns
    ``out [B, H, S, dv]`` and the state after the last token.

    Per chunk: keys ``Q = exp(lk - mk)`` (``mk`` the per-splat max over the chunk's keys) give the
    chunk's log-normaliser and memory; with ``c_s = max(mk_s, z_s)`` (``z`` the state before the
    chunk) one query factor ``E_ts = exp(lq_ts + c_s - R_t)``, ``R_t = max_s(lq_ts + c_s)``, serves
    both terms: intra-chunk ``w_tj e^{-R_t} = Σ_s E_ts Q_js e^{mk_s - c_s}`` (one matmul, causal
    mask) and past ``Σ_s e^{lq_ts + z_s - R_t} M_s = Σ_s E_ts (e^{z_s - c_s} M_s)`` (one matmul).
    Every factor is ``<= 1`` and at least the product it contributes to, so every term within
    ``e^-87`` of ``e^{R_t}`` is computed exactly. ``R_t`` may come from a *future* key of the chunk;
    a visible row whose total then falls below ``e^{-INTRA_MARGIN}`` is recomputed in log space, so
    what underflow drops is always below ``(C+1)·K·e^{INTRA_MARGIN-87}`` of a row's total.
    All stabilisers (``mk``, ``c``, ``R``) are detached: the result does not depend on them.
    """
    b, h, s, k = lq.shape
    dv = v.shape[-1]
    nc, c = s // chunk, chunk
    x = b * h
    lqc = lq.reshape(x, nc, c, k)
    lkc = lk.reshape(x, nc, c, k)
    vc = v.reshape(x, nc, c, dv)

    # keys: per-chunk log-normalisers and memories (all chunks at once)
    mk = lkc.detach().amax(dim=-2)  # [x, nc, K]; -inf: no key of the chunk for that splat
    has = torch.isfinite(mk)
    mk_ref = torch.where(has, mk, torch.zeros_like(mk))
    q_feat = torch.exp(lkc - mk_ref.unsqueeze(-2))  # Q <= 1
    sq = q_feat.sum(dim=-2)  # >= 1 where mk is finite
    zc = torch.where(has, mk_ref + torch.log(torch.where(has, sq, torch.ones_like(sq))), NEG_INF)
    u = q_feat.transpose(-1, -2) @ vc  # [x, nc, K, dv]

    # the recurrence over chunks in closed form: entry 0 is the incoming state, entry p >= 1 chunk p-1;
    # z_all[c] = logsumexp_{p <= c} z_ext[p], M_all[c] = Σ_{p <= c} exp(m_ext[p] - z_all[c]) u_ext[p]
    z_ext = torch.cat((z.reshape(x, 1, k), zc), dim=1)  # [x, nc + 1, K]
    m_ext = torch.cat((z.reshape(x, 1, k), mk), dim=1)
    u_ext = torch.cat((M.reshape(x, 1, k, dv), u), dim=1)  # [x, nc + 1, K, dv]
    upto = torch.ones(nc + 1, nc + 1, dtype=torch.bool, device=lq.device).tril().unsqueeze(-1)  # [c, p, 1]
    z_all = safe_logsumexp(torch.where(upto, z_ext.unsqueeze(1), NEG_INF), dim=2)  # [x, nc + 1, K]
    z_ref = _finite_or_zero(z_all)
    expo = torch.where(upto, m_ext.unsqueeze(1) - z_ref.unsqueeze(2), NEG_INF)  # [x, c, p, K], <= 0
    m_all = torch.einsum("xcpk,xpkd->xckd", torch.exp(expo), u_ext)  # [x, nc + 1, K, dv]
    zb, mb = z_all[:, :-1], m_all[:, :-1]

    # one shared per-splat offset and one query factor for both terms
    cs_raw = torch.maximum(mk, zb.detach())  # -inf: no key at all yet for that splat
    cs = _finite_or_zero(cs_raw)
    q_scaled = q_feat * torch.exp(mk - cs).unsqueeze(-2)  # Q e^{mk - c} <= 1
    e_past = torch.exp(zb - cs)  # [x, nc, K], <= 1
    a = lqc + cs_raw.unsqueeze(-2)
    e_feat = torch.exp(a - _finite_or_zero(a.detach().amax(dim=-1, keepdim=True)))  # [x, nc, C, K]
    g = (e_feat @ q_scaled.transpose(-1, -2)).tril()  # [x, nc, C, C]
    num = g @ vc + e_feat @ (e_past.unsqueeze(-1) * mb)
    den = g.sum(-1, keepdim=True) + (e_feat * e_past.unsqueeze(-2)).sum(-1, keepdim=True)
    small = den.detach() < MIN_ROW_TOTAL  # no visible key (den = 0, num = 0), or recomputed below
    out = num / torch.where(small, torch.ones_like(den), den)
    flag = seen.reshape(x, nc, c) & small.squeeze(-1)
    if bool(flag.any()):
        xi, ci, ti = flag.nonzero(as_tuple=True)
        rows, _ = exact_causal_rows(lqc[xi, ci, ti], lkc[xi, ci], ti, vc[xi, ci], zb[xi, ci], mb[xi, ci])
        out = out.index_put((xi, ci, ti), rows)
    return out.reshape(b, h, s, dv), z_all[:, -1].reshape(b, h, k), m_all[:, -1].reshape(b, h, k, dv)


__all__ = ["causal_chunks_reference"]
