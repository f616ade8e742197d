"""The ``kernel`` backend's causal chunked path: an in-place forward and a hand-derived backward.

:class:`CausalKernel` is a ``torch.autograd.Function`` over a whole causal sequence. Its forward runs
:func:`chunk_forward` block by block, without autograd, in buffers reused from block to block, and
saves only what cannot be recomputed cheaply: the inputs, the outputs, each row's log-normaliser
``L_t`` and the recurrent state at each block boundary (``O(K·d)`` per block). Its backward walks the
blocks in reverse, recomputes each block's log-features (one GEMM) and chunk quantities, and applies
the gradient below (:func:`chunk_backward`). Memory for forward+backward is therefore linear in ``n``
with a small constant (nothing ``[n, C]`` or ``[n, K]``-sized is kept across blocks).

The gradient. With ``P_tj = w_tj e^{-L_t}`` (the attention weights), ``D_t = do_t·o_t`` and
``A_tj = do_t·v_j - D_t`` for visible pairs ``j <= t``:

- ``dv_j = Σ_t P_tj do_t``;
- ``dlq_ts = Σ_{j<=t} e^{lq_ts + lk_js - L_t} A_tj``: intra-chunk pairs through the forward's shared
  factors, the past through the state before the chunk, ``e^{lq_ts + z_s - L_t}(do_t·M_s - D_t)``;
- ``dlk_js = Σ_{t>=j} e^{lq_ts + lk_js - L_t} A_tj``: intra-chunk pairs as above; later chunks through a
  *reverse* state per splat, the log-weight ``Y_s = log Σ_t e^{lq_ts - L_t}`` of the later queries and
  the normalised ``N_s = Σ_t e^{lq_ts - L_t - Y_s} [do_t, D_t]``, so that
  ``dlk_js = e^{lk_js + Y_s}(v_j·N_s - N_s^D)`` and ``dv_j += Σ_s e^{lk_js + Y_s} N_s``.

Every exponent is bounded: ``lq_ts + lk_js <= log w_tj <= L_t`` for a visible pair, hence
``lk_js + Y_s <= log n``. The incoming state is a key of log-feature ``z0`` and value ``M0`` seen by
every query, and a gradient of the outgoing state enters the reverse state as one more "query" of
log-weight ``-z_s`` and values ``[dM_s, M_s·dM_s - dz_s]``: gradients flow through states both ways.
Rows the forward recomputed in log space (a much larger future key of the same chunk set their
stabiliser) get their intra-chunk gradient in log space too (:func:`_exact_row_grads`).

``gsa_plugins.backends.kernel_naive.causal_chunks_reference`` is the same forward written with
autograd, kept beside this one as its reference (flash-linear-attention's ``naive.py`` convention).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gsa_core.bank import FeatureMap
from gsa_core.numerics import NEG_INF, finite_max, safe_logsumexp

#: A visible row whose total, relative to its stabiliser, is below ``e^-INTRA_MARGIN`` is recomputed
#: in log space (fp32 normals reach ``e^-87``; ``(C+1)·K <= e^{8.4}`` for 64x64).
INTRA_MARGIN = 60.0
MIN_ROW_TOTAL = math.exp(-INTRA_MARGIN)


class Workspace:
    """Buffers reused from block to block: fresh large allocations cost page faults on every block."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


_THREAD_LOCAL = threading.local()


def workspace() -> Workspace:
    """This thread's workspace (kept between calls; its size is bounded by the block size)."""
    ws = getattr(_THREAD_LOCAL, "workspace", None)
    if ws is None:
        ws = _THREAD_LOCAL.workspace = Workspace()
    return ws


# ----------------------------------------------------------------------------- the plan of one sequence
@dataclass(frozen=True)
class Plan:
    """What a causal pass needs besides tensors: the feature map's fixed parts, chunk and block sizes."""

    kind: str
    centre: Tensor
    alive: Tensor
    chunk: int
    step: int  # tokens per block (a multiple of chunk)
    key_padding: Tensor | None  # [B, n] bool

    def features(self, weight: Tensor, bias: Tensor, white: Tensor | None) -> FeatureMap:
        return FeatureMap(self.kind, self.centre, weight, bias, white, self.alive)


def seen_rows(key_padding: Tensor | None, sl: slice, z: Tensor, padded: int) -> Tensor:
    """``[B·H, padded]``: whether query ``t`` of the block has any real key at or before it."""
    b, h, _ = z.shape
    prior = torch.isfinite(z).any(-1).reshape(b * h, 1)  # keys absorbed before this block
    n = sl.stop - sl.start
    if key_padding is None:
        real = torch.ones(b * h, n, dtype=torch.bool, device=z.device)
    else:
        real = (key_padding[:, sl].to(z.device).cumsum(1) > 0).repeat_interleave(h, dim=0)
    seen = real | prior
    return F.pad(seen, (0, padded - n), value=False) if padded != n else seen


def _pad(x: Tensor, length: int, value: float) -> Tensor:
    extra = length - x.shape[-2]
    return x if extra == 0 else F.pad(x, (0, 0, 0, extra), value=value)


def block_features(fmap: FeatureMap, q: Tensor, k: Tensor, key_padding: Tensor | None,
                   ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """Log-features of one block's queries and keys (padded keys ``-inf``: masked features, not values).

    With a workspace (no autograd): written into reused buffers, valid until the next block.
    """
    if ws is None or fmap.kind == "full":
        lq, lk = fmap(q), fmap(k)
    else:
        rows, k_slots = q.shape[:-1], fmap.alive.shape[-1]
        xa = ws.get("xa", (*rows, fmap.width()), fmap.weight)
        lq = fmap(q, buffers=(xa, ws.get("lq", (*rows, k_slots), fmap.weight)))
        lk = fmap(k, buffers=(xa, ws.get("lk", (*rows, k_slots), fmap.weight)))
    if key_padding is not None:
        pad = ~key_padding[:, None, :, None].to(lk.device)
        lk = lk.masked_fill(pad, NEG_INF) if ws is None else lk.masked_fill_(pad, NEG_INF)
    return lq, lk


# ----------------------------------------------------------------------------- forward
def _exact_rows(lq_rows: Tensor, lk_rows: Tensor, t: Tensor) -> Tensor:
    """Log pair weights of a few rows: ``[m, K] x [m, C, K] -> [m, C]``, ``-inf`` after ``t``."""
    logw = safe_logsumexp(lq_rows.unsqueeze(-2) + lk_rows, dim=-1)
    cols = torch.arange(lk_rows.shape[-2], device=lk_rows.device)
    return logw.masked_fill(cols.unsqueeze(0) > t.unsqueeze(1), NEG_INF)


def exact_causal_rows(lq_rows: Tensor, lk_rows: Tensor, t: Tensor, v_rows: Tensor, z_rows: Tensor,
                      m_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs and log-normalisers of a few causal rows in log space: intra-chunk keys ``<= t`` plus the
    incoming state. ``lq_rows [m, K]``, ``lk_rows [m, C, K]``, ``t [m]``, ``v_rows [m, C, dv]``,
    ``z_rows [m, K]``, ``m_rows [m, K, dv]`` -> ``([m, dv], [m])``."""
    logw = _exact_rows(lq_rows, lk_rows, t)  # [m, C]
    a_past = lq_rows + z_rows  # [m, K]
    ref = finite_max(torch.cat((logw, a_past), dim=-1), dim=-1)
    w, p = torch.exp(logw - ref), torch.exp(a_past - ref)
    num = (w.unsqueeze(-2) @ v_rows + p.unsqueeze(-2) @ m_rows).squeeze(-2)
    den = w.sum(-1, keepdim=True) + p.sum(-1, keepdim=True)
    ok = den > 0
    den = torch.where(ok, den, torch.ones_like(den))
    return num / den, torch.where(ok, torch.log(den) + ref, NEG_INF).squeeze(-1)


@dataclass
class _Chunks:
    """One block's chunk quantities, shared by the forward and the backward (``x = B·H``)."""

    mk: Tensor  # [x, nc, K] per-splat key max of each chunk
    q_feat: Tensor  # [x, nc, C, K] exp(lk - mk) e^{mk - c} <= 1
    zb: Tensor  # [x, nc, K] log-normaliser before each chunk
    mb: Tensor  # [x, nc, K, dv] normalised memory before each chunk
    e_past: Tensor  # [x, nc, K] e^{zb - c} <= 1
    cs: Tensor  # [x, nc, K] c (0 where no key yet: then every factor carrying it is 0)
    e_feat: Tensor  # [x, nc, C, K] e^{lq + c - R} <= 1
    row: Tensor  # [x, nc, C, 1] R
    g: Tensor  # [x·nc, C, C] intra-chunk weights / e^R (causal)
    den: Tensor  # [x·nc, C, 1] row totals / e^R
    z_last: Tensor  # [x, K]
    m_last: Tensor  # [x, K, dv]


def _chunks(lqc: Tensor, lkc: Tensor, vc: Tensor, z: Tensor, M: Tensor, ws: Workspace, tag: str) -> _Chunks:
    """Per chunk and splat ``c_s = max(mk_s, z_s)`` gives one query factor ``E_ts = exp(lq_ts + c_s - R_t)``,
    ``R_t = max_s(lq_ts + c_s)``, shared by the intra-chunk term ``w_tj e^{-R_t} = Σ_s E_ts Q_js e^{mk_s - c_s}``
    and the past term ``Σ_s e^{lq_ts + z_s - R_t} M_s = Σ_s E_ts (e^{z_s - c_s} M_s)``. Every factor is
    ``<= 1`` and at least the product it contributes to, so every term within ``e^-87`` of ``e^{R_t}`` is
    exact. ``lqc, lkc [x, nc, C, K]``, ``vc [x·nc, C, dv]``."""
    x, nc, c, k = lqc.shape
    dv = vc.shape[-1]
    mk = lkc.amax(dim=-2)  # -inf: no key of the chunk for that splat
    mk_ref = torch.nan_to_num(mk, neginf=0.0)
    q_feat = torch.sub(lkc, mk_ref.unsqueeze(-2), out=ws.get(tag + "q", (x, nc, c, k), lqc)).exp_()
    zc = q_feat.sum(dim=-2).log_().add_(mk)  # log 0 + (-inf) = -inf
    q3 = q_feat.view(x * nc, c, k)
    u = torch.bmm(q3.transpose(1, 2), vc, out=ws.get(tag + "u", (x * nc, k, dv), lqc)).view(x, nc, k, dv)
    # the state before every chunk: z by a prefix log-sum-exp, M by the recurrence (cheap loops)
    z_all = torch.empty(x, nc + 1, k, dtype=lqc.dtype, device=lqc.device)
    z_all[:, 0] = z
    for i in range(nc):
        torch.logaddexp(z_all[:, i], zc[:, i], out=z_all[:, i + 1])
    z_ref = torch.nan_to_num(z_all[:, 1:], neginf=0.0)
    alpha = (z_all[:, :-1] - z_ref).exp_().unsqueeze(-1)  # exp(z_prev - z_new) <= 1
    beta = (mk - z_ref).exp_().unsqueeze(-1)  # exp(mk - z_new) <= 1
    mb = ws.get(tag + "mb", (x, nc, k, dv), lqc)
    mb[:, 0] = M
    for i in range(1, nc):
        torch.mul(mb[:, i - 1], alpha[:, i - 1], out=mb[:, i]).addcmul_(beta[:, i - 1], u[:, i - 1])
    m_last = torch.mul(mb[:, -1], alpha[:, -1]).addcmul_(beta[:, -1], u[:, -1])
    zb = z_all[:, :-1]
    cs = torch.maximum(mk, zb)
    cs_ref = torch.nan_to_num(cs, neginf=0.0)
    q_feat.mul_((mk - cs_ref).exp_().unsqueeze(-2))
    e_past = (zb - cs_ref).exp_()
    e_feat = torch.add(lqc, cs.unsqueeze(-2), out=ws.get(tag + "e", (x, nc, c, k), lqc))
    row = torch.nan_to_num(e_feat.amax(dim=-1, keepdim=True), neginf=0.0)
    e3 = e_feat.sub_(row).exp_().view(x * nc, c, k)
    g = torch.bmm(e3, q3.transpose(1, 2), out=ws.get(tag + "g", (x * nc, c, c), lqc)).tril_()
    den = torch.mul(e3, e_past.view(x * nc, 1, k)).sum(-1, keepdim=True).add_(g.sum(-1, keepdim=True))
    return _Chunks(mk, q_feat, zb, mb, e_past, cs_ref, e_feat, row, g, den, z_all[:, -1], m_last)


def _block(lq: Tensor, lk: Tensor, v: Tensor, z: Tensor, M: Tensor, chunk: int, ws: Workspace,
           tag: str) -> tuple[Tensor, Tensor, Tensor, _Chunks]:
    """One block's chunked views ``lqc, lkc [x, nc, C, K]``, ``vc [x·nc, C, dv]`` and its :class:`_Chunks`."""
    b, h, s, k = lq.shape
    dv, nc, x = v.shape[-1], s // chunk, b * h
    lqc, lkc = lq.reshape(x, nc, chunk, k), lk.reshape(x, nc, chunk, k)
    vc = v.reshape(x * nc, chunk, dv)
    return lqc, lkc, vc, _chunks(lqc, lkc, vc, z.reshape(x, k), M.reshape(x, k, dv), ws, tag)


@torch.no_grad()
def chunk_forward(lq: Tensor, lk: Tensor, v: Tensor, z: Tensor, M: Tensor, chunk: int, seen: Tensor, out: Tensor,
                  lse: Tensor | None, ws: Workspace) -> tuple[Tensor, Tensor]:
    """Causal attention over ``S = nc·chunk`` tokens from state ``(z [B, H, K], M [B, H, K, dv])``.

    ``lq, lk [B, H, S, K]`` (masked keys ``-inf``), ``v [B, H, S, dv]``, ``seen [B·H, S]`` (whether a row
    has any visible key). Writes the first ``out.shape[-2]`` outputs into ``out [B, H, <= S, dv]`` and,
    when given, their log-normalisers into ``lse [B, H, <= S]``; returns the state after the last token.
    A visible row whose total falls below ``e^{-INTRA_MARGIN}`` of its stabiliser (set by a much larger
    future key of the chunk) is recomputed in log space.
    """
    b, h, s, k = lq.shape
    dv, nc, c, x = v.shape[-1], s // chunk, chunk, b * h
    lqc, lkc, vc, ch = _block(lq, lk, v, z, M, chunk, ws, "f")
    m_scaled = torch.mul(ch.mb, ch.e_past.unsqueeze(-1), out=ws.get("ms", (x, nc, k, dv), lq))
    e3 = ch.e_feat.view(x * nc, c, k)
    num = torch.bmm(ch.g, vc, out=ws.get("num", (x * nc, c, dv), lq))
    num.baddbmm_(e3, m_scaled.view(x * nc, k, dv))
    den = ch.den
    small = den < MIN_ROW_TOTAL  # no visible key (den = 0, num = 0), or recomputed below
    flag = seen.view(x * nc, c, 1) & small
    length = out.shape[-2]
    if lse is not None:
        torch.add(torch.log(den).view(b, h, s)[..., :length], ch.row.view(b, h, s)[..., :length], out=lse)
        lse.masked_fill_(small.view(b, h, s)[..., :length], NEG_INF)
    den = den.masked_fill_(small, 1.0).view(b, h, s, 1)[..., :length, :]
    torch.div(num.view(b, h, s, dv)[..., :length, :], den, out=out)
    if bool(flag.any()):
        xi, ci, ti = flag.view(x, nc, c).nonzero(as_tuple=True)
        rows, rows_lse = exact_causal_rows(lqc[xi, ci, ti], lkc[xi, ci], ti, vc.view(x, nc, c, dv)[xi, ci],
                                           ch.zb[xi, ci], ch.mb[xi, ci])
        tok = ci * c + ti
        keep = tok < length
        out[(xi // h)[keep], (xi % h)[keep], tok[keep]] = rows[keep]
        if lse is not None:
            lse[(xi // h)[keep], (xi % h)[keep], tok[keep]] = rows_lse[keep]
    return ch.z_last.reshape(b, h, k).clone(), ch.m_last.reshape(b, h, k, dv)  # clone: z_all is not kept


# ----------------------------------------------------------------------------- backward
@dataclass
class Reverse:
    """The reverse state: per splat the log-weight ``y [x, K]`` of the later queries and
    ``n [x, K, dv + 1]``, their normalised ``[do, D]`` (``D_t = do_t·o_t``)."""

    y: Tensor
    n: Tensor

    def merge(self, y2: Tensor, n2: Tensor) -> Reverse:
        y = torch.logaddexp(self.y, y2)
        ref = torch.nan_to_num(y, neginf=0.0)
        a, b = (self.y - ref).exp().unsqueeze(-1), (y2 - ref).exp().unsqueeze(-1)
        return Reverse(y, a * self.n + b * n2)


def _exact_row_grads(lq_rows: Tensor, lk_rows: Tensor, t: Tensor, v_rows: Tensor, lse_rows: Tensor,
                     do_rows: Tensor, d_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intra-chunk gradients of a few rows in log space: ``(dlq [m, K], dlk [m, C, K], dv [m, C, dv])``."""
    cols = torch.arange(lk_rows.shape[-2], device=lk_rows.device)
    visible = (cols.unsqueeze(0) <= t.unsqueeze(1)).unsqueeze(-1)  # [m, C, 1]
    pair = lq_rows.unsqueeze(-2) + lk_rows - lse_rows[:, None, None]  # [m, C, K], <= 0 where visible
    pi = torch.exp(torch.where(visible, pair, NEG_INF))
    a = (v_rows @ do_rows.unsqueeze(-1)).squeeze(-1) - d_rows.unsqueeze(-1)  # [m, C]
    weighted = pi * a.unsqueeze(-1)
    p = pi.sum(-1)  # [m, C]: P_tj
    return weighted.sum(-2), weighted, p.unsqueeze(-1) * do_rows.unsqueeze(-2)


@torch.no_grad()
def chunk_backward(lq: Tensor, lk: Tensor, v: Tensor, z: Tensor, M: Tensor, chunk: int, seen: Tensor, out: Tensor,
                   lse: Tensor, dout: Tensor, rev: Reverse, ws: Workspace) -> tuple[Tensor, Tensor, Tensor, Reverse]:
    """Gradients of one block (shapes as :func:`chunk_forward`, ``out, lse, dout`` padded to ``S``).

    ``rev`` covers every query after this block (and the outgoing state's gradient); returns
    ``dlq, dlk [B, H, S, K]``, ``dv [B, H, S, dv]`` and the reverse state covering this block's queries too.
    """
    b, h, s, k = lq.shape
    dv, nc, c, x = v.shape[-1], s // chunk, chunk, b * h
    lqc, lkc, vc, ch = _block(lq, lk, v, z, M, chunk, ws, "b")
    do3 = dout.reshape(x * nc, c, dv)
    d_row = (dout * out).sum(-1).reshape(x * nc, c, 1)  # D_t
    small = ch.den < MIN_ROW_TOTAL
    flag = seen.view(x * nc, c, 1) & small
    inv_den = torch.where(small, torch.zeros_like(ch.den), ch.den.reciprocal())  # e^{R_t - L_t}; 0: exact rows
    e3 = ch.e_feat.view(x * nc, c, k)
    se = e3 * inv_den  # e^{lq_ts + c_s - L_t}, <= e^{INTRA_MARGIN}
    q3 = ch.q_feat.view(x * nc, c, k)
    # intra-chunk pairs
    a = torch.bmm(do3, vc.transpose(1, 2)).sub_(d_row).tril_()  # A_tj
    p = ch.g * inv_den  # P_tj
    dv_all = torch.bmm(p.transpose(1, 2), do3)  # [x·nc, C, dv]
    dlq = torch.bmm(a, q3).mul_(se)  # [x·nc, C, K]
    dlk = torch.bmm(a.transpose(1, 2), se).mul_(q3)
    # every row's query weight e^{lq_ts - L_t} = w_ts e^{ref_s}; without recomputed rows w = se, ref = -c
    # (se <= e^{INTRA_MARGIN}); with them, w and ref from lq - L directly (w <= 1, ref + zb <= 0)
    any_flag = bool(flag.any())
    if any_flag:
        lse3 = lse.reshape(x * nc, c, 1)
        lw = torch.where(torch.isfinite(lse3), lq.reshape(x * nc, c, k) - lse3, NEG_INF)
        ref = torch.nan_to_num(lw.amax(dim=-2), neginf=0.0).view(x * nc, k)
        w = lw.sub_(ref.unsqueeze(-2)).exp_()
        past = w * (ref.view(x, nc, k) + ch.zb).exp().view(x * nc, 1, k)
    else:
        w, ref = se, -ch.cs.view(x * nc, k)
        past = se * ch.e_past.view(x * nc, 1, k)
    # the past: e^{lq_ts + zb_s - L_t} (do_t·M_s - D_t)
    dlq.add_(torch.bmm(do3, ch.mb.view(x * nc, k, dv).transpose(1, 2)).sub_(d_row).mul_(past))
    # rows recomputed in log space: their intra-chunk part exactly
    if any_flag:
        xi, ci, ti = flag.view(x, nc, c).nonzero(as_tuple=True)
        flat = xi * nc + ci
        g_q, g_k, g_v = _exact_row_grads(lqc[xi, ci, ti], lkc[xi, ci], ti, vc.view(x, nc, c, dv)[xi, ci],
                                         lse.reshape(x, nc, c)[xi, ci, ti], do3.view(x, nc, c, dv)[xi, ci, ti],
                                         d_row.view(x, nc, c)[xi, ci, ti])
        dlq[flat, ti] += g_q
        dlk.index_put_((flat,), g_k, accumulate=True)
        dv_all.index_put_((flat,), g_v, accumulate=True)
    # each chunk's queries as a reverse-state entry: y = ref + log Σ_t W_ts, n = Σ_t W_ts [do_t, D_t] / Σ W
    sw = w.sum(-2)  # [x·nc, K]
    has = sw > 0
    y_chunk = torch.where(has, ref + torch.log(torch.where(has, sw, torch.ones_like(sw))), NEG_INF)
    dod = ws.get("dod", (x * nc, c, dv + 1), lq)  # [do, D]
    dod[..., :dv], dod[..., dv:] = do3, d_row
    n_chunk = torch.bmm(w.transpose(1, 2), dod).div_(torch.where(has, sw, torch.ones_like(sw)).unsqueeze(-1))
    y_chunk, n_chunk = y_chunk.view(x, nc, k), n_chunk.view(x, nc, k, dv + 1)
    # keys of chunk i see the reverse state of chunks > i: loop from the last chunk back
    y_after = torch.empty(x, nc, k, dtype=lq.dtype, device=lq.device)
    n_after = torch.empty(x, nc, k, dv + 1, dtype=lq.dtype, device=lq.device)
    for i in range(nc - 1, -1, -1):
        y_after[:, i], n_after[:, i] = rev.y, rev.n
        rev = rev.merge(y_chunk[:, i], n_chunk[:, i])
    # dlk_js += e^{lk_js + Y_s}(v_j·N_s - N^D_s), dv_j += Σ_s e^{lk_js + Y_s} N_s, as (Q e^{mk - c}) e^{c + Y}:
    # c + Y <= log(n + 1) (c is a key's or the past keys' log-feature, all seen by the later queries)
    qk = ch.q_feat.mul_((ch.cs + y_after).exp_().unsqueeze(-2))
    qk3 = qk.view(x * nc, c, k)
    n3 = n_after.view(x * nc, k, dv + 1)
    dlk.addcmul_(qk3, torch.bmm(vc, n3[..., :dv].transpose(1, 2)).sub_(n3[..., dv].unsqueeze(-2)))
    dv_all.baddbmm_(qk3, n3[..., :dv])
    return dlq.view(b, h, s, k), dlk.view(b, h, s, k), dv_all.view(b, h, s, dv), rev


def state_grads(z0: Tensor, M0: Tensor, rev: Reverse) -> tuple[Tensor, Tensor]:
    """The incoming state as a key seen by every query: ``dM0 = e^{z0 + Y} N``, ``dz0 = e^{z0 + Y}(M0·N - N^D)``."""
    b, h, k = z0.shape
    dv = M0.shape[-1]
    e = (z0.reshape(b * h, k) + rev.y).exp().unsqueeze(-1)  # z0 + Y <= log(n + 1)
    dm = e * rev.n[..., :dv]
    dz = (M0.reshape(b * h, k, dv) * dm).sum(-1) - e.squeeze(-1) * rev.n[..., dv]
    return dz.view(b, h, k), dm.view(b, h, k, dv)


def initial_reverse(z_last: Tensor, M_last: Tensor, dz: Tensor | None, dM: Tensor | None) -> Reverse:
    """The outgoing state's gradient as a reverse-state entry of log-weight ``-z`` and ``[dM, M·dM - dz]``."""
    b, h, k = z_last.shape
    dv = M_last.shape[-1]
    x = b * h
    if dz is None and dM is None:
        return Reverse(z_last.new_full((x, k), NEG_INF), z_last.new_zeros(x, k, dv + 1))
    dM = torch.zeros_like(M_last) if dM is None else dM
    dz = torch.zeros_like(z_last) if dz is None else dz
    y = torch.where(torch.isfinite(z_last), -z_last, NEG_INF).reshape(x, k)
    n = torch.cat(((dM).reshape(x, k, dv), ((M_last * dM).sum(-1) - dz).reshape(x, k, 1)), dim=-1)
    return Reverse(y, torch.where(torch.isfinite(y).unsqueeze(-1), n, torch.zeros_like(n)))


# ----------------------------------------------------------------------------- the whole sequence
def causal_blocks(plan: Plan, fmap: FeatureMap, q: Tensor, k: Tensor, v: Tensor, z: Tensor, M: Tensor,
                  lse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """The causal forward over every block without autograd: ``(out, z, M, states at block starts)``."""
    c, step = plan.chunk, plan.step
    n = q.shape[-2]
    dtype = fmap.weight.dtype
    ws = workspace()
    out = torch.empty(*q.shape[:2], n, v.shape[-1], dtype=dtype, device=q.device)
    starts: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            starts.append((z, M))
            kp = None if plan.key_padding is None else plan.key_padding[:, sl]
            lq, lk = block_features(fmap, q[..., sl, :], k[..., sl, :], kp, ws)
            vb = v[..., sl, :].to(dtype)
            length = lq.shape[-2]
            padded = -(-length // c) * c
            if padded != length:
                lq, lk, vb = _pad(lq, padded, NEG_INF), _pad(lk, padded, NEG_INF), _pad(vb, padded, 0.0)
            seen = seen_rows(plan.key_padding, sl, z, padded)
            z, M = chunk_forward(lq, lk, vb, z.to(dtype), M.to(dtype), c, seen, out[..., sl, :],
                                 None if lse is None else lse[..., sl], ws)
    return out, z, M, starts


class CausalKernel(torch.autograd.Function):
    """Causal kernel attention of aligned ``q, k [B, H, n, d]``, ``v [B, H, n, dv]`` from state ``(z0, M0)``,
    differentiable in q, k, v, the state and the feature map's tensors (``weight, bias, white``)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, z0: Tensor, M0: Tensor, weight: Tensor, bias: Tensor,
                white: Tensor | None, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
        fmap = plan.features(weight, bias, white)
        lse = torch.empty(q.shape[:3], dtype=weight.dtype, device=q.device)
        out, z, M, starts = causal_blocks(plan, fmap, q, k, v, z0, M0, lse)
        ctx.plan = plan
        ctx.has_white = white is not None
        ctx.n_blocks = len(starts)
        flat = [t for pair in starts for t in pair]
        ctx.save_for_backward(q, k, v, z0, M0, weight, bias, white if white is not None else bias, out, lse, z, M,
                              *flat)
        return out, z, M

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of coming out wrong
    def backward(ctx: Any, dout: Tensor | None, dz: Tensor | None, dM: Tensor | None) -> tuple[Any, ...]:
        plan: Plan = ctx.plan
        q, k, v, z0, M0, weight, bias, white, out, lse, z_last, m_last, *flat = ctx.saved_tensors
        white = white if ctx.has_white else None
        starts = [(flat[2 * i], flat[2 * i + 1]) for i in range(ctx.n_blocks)]
        dtype = weight.dtype
        c, step = plan.chunk, plan.step
        n = q.shape[-2]
        dout = torch.zeros_like(out) if dout is None else dout.to(dtype)
        leaves = [t.detach().requires_grad_() for t in (weight, bias)] + ([white.detach().requires_grad_()]
                                                                          if white is not None else [])
        fmap = plan.features(*leaves[:2], leaves[2] if white is not None else None)
        dq, dk = torch.empty_like(q), torch.empty_like(k)  # every block writes its rows
        dv = torch.empty(v.shape, dtype=dtype, device=v.device)
        d_leaves = [torch.zeros_like(t) for t in leaves]
        rev = initial_reverse(z_last, m_last, dz, dM)
        ws = workspace()
        blocks = list(range(0, n, step))
        for bi in range(len(blocks) - 1, -1, -1):
            start = blocks[bi]
            sl = slice(start, min(n, start + step))
            zb, mb = starts[bi]
            kp = None if plan.key_padding is None else plan.key_padding[:, sl]
            qb, kb = q[..., sl, :], k[..., sl, :]
            by_hand = fmap.kind != "full"  # features' backward by hand (FeatureMap.vjp), else autograd
            if by_hand:  # the forward's exact features (same buffers, same bits), no graph
                lq_b, lk_b = block_features(fmap, qb, kb, kp, ws)
            else:
                qb, kb = qb.detach().requires_grad_(), kb.detach().requires_grad_()
                with torch.enable_grad():
                    lq_g, lk_g = block_features(fmap, qb, kb, kp)
                lq_b, lk_b = lq_g.detach(), lk_g.detach()
            length = lq_b.shape[-2]
            padded = -(-length // c) * c
            lq, lk = _pad(lq_b, padded, NEG_INF), _pad(lk_b, padded, NEG_INF)
            vb = _pad(v[..., sl, :].to(dtype), padded, 0.0)
            ob, db = _pad(out[..., sl, :], padded, 0.0), _pad(dout[..., sl, :], padded, 0.0)
            lb = lse[..., sl]
            if padded != length:
                lb = F.pad(lb, (0, padded - length), value=NEG_INF)
            seen = seen_rows(plan.key_padding, sl, zb, padded)
            dlq, dlk, dvb, rev = chunk_backward(lq, lk, vb, zb.to(dtype), mb.to(dtype), c, seen, ob, lb, db, rev, ws)
            del lq, lk, vb, ob, db
            dv[..., sl, :] = dvb[..., :length, :]
            dlq, dlk = dlq[..., :length, :], dlk[..., :length, :]
            if kp is not None:  # padded keys' features are constants (-inf)
                dlk = dlk.masked_fill(~kp[:, None, :, None].to(dlk.device), 0.0)
            if by_hand:  # written straight into dq, dk; the augmented vectors in reused buffers
                wide = (*qb.shape[:-1], fmap.width())
                bufs = (ws.get("xa", wide, dlq), ws.get("dxa", wide, dlq))
                _, dw_q, db_q = fmap.vjp(qb, dlq, buffers=bufs, out=dq[..., sl, :])
                _, dw_k, db_k = fmap.vjp(kb, dlk, buffers=bufs, out=dk[..., sl, :])
                grads = [dw_q + dw_k, db_q + db_k]
            else:
                grads = list(torch.autograd.grad((lq_g, lk_g), (qb, kb, *leaves), (dlq, dlk), allow_unused=True))
                dq[..., sl, :] = grads.pop(0)
                dk[..., sl, :] = grads.pop(0)
            for acc, g in zip(d_leaves, grads, strict=False):
                if g is not None:
                    acc += g
        dz0, dM0 = state_grads(z0.to(dtype), M0.to(dtype), rev)
        d_white = d_leaves[2] if white is not None else None
        return (dq, dk, dv.to(v.dtype), dz0.to(z0.dtype), dM0.to(M0.dtype), d_leaves[0], d_leaves[1], d_white, None)


def causal_kernel(plan: Plan, fmap: FeatureMap, q: Tensor, k: Tensor, v: Tensor, z: Tensor,
                  M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention from state ``(z, M)``: ``(out, z, M)`` in the map's dtype; through
    :class:`CausalKernel` when anything needs a gradient, else the in-place forward alone."""
    tensors = (q, k, v, z, M, fmap.weight, fmap.bias, fmap.white_centers)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return CausalKernel.apply(q, k, v, z, M, fmap.weight, fmap.bias, fmap.white_centers, plan)
    out, z, M, _ = causal_blocks(plan, fmap, q, k, v, z, M, None)
    return out, z, M
