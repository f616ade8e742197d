"""``kernel``: exact GSA attention in ``O(n·K·(C + d))`` time with an ``O(K·d)`` recurrent state.

Because ``w_tj = Σ_s exp(lq_ts + lk_js)`` factorises through the splats, GSA is a linear attention
with feature map ``phi_s = exp(l_s)`` (DESIGN.md section 2). Everything stays in log space, without
any epsilon:

- per splat the state keeps ``z_s = logsumexp_j lk_js`` over the keys seen so far and the
  *normalised* memory ``M_s = Σ_j exp(lk_js - z_s) v_j`` (a convex combination of values, so
  bounded); then ``o_t = Σ_s softmax_s(lq_ts + z_s) · M_s``. Non-causal and cross-attention build the
  state over all keys and read it with one matmul;
- causal attention runs in chunks of ``C`` tokens: the state is carried across chunks with
  ``exp(z_old - z_new) <= 1`` rescaling, and inside a chunk the past-state term and the intra-chunk
  pair weights (one ``[C, K] x [K, C]`` matmul) are combined under one shared per-row stabiliser
  before normalising (see :func:`_causal_chunks` for the exact arithmetic);
- every stabiliser is a max over one chunk, one row or one splat's keys of a chunk, never over the
  whole sequence, so causal outputs never depend on later chunks and prefill-then-decode equals one
  forward. A row whose chunk stabiliser was set by a much larger *future* key of the same chunk (so
  that its visible terms could underflow) is detected and recomputed in log space.

Heavy work is batched matmuls over all chunks of a block; only the ``O(K·d)`` state recurrence runs
as a Python loop over chunks. Without autograd a second implementation does the same arithmetic in
place, in buffers reused from block to block (:func:`_causal_chunks_inplace`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank, compute_dtype
from gsa_core.errors import MaskNotSupportedError
from gsa_core.flops import feature_flops
from gsa_core.masks import MaskSpec
from gsa_core.numerics import NEG_INF, check_finite, finite_max, safe_logsumexp, safe_lse_softmax, safe_softmax
from gsa_core.recurrent import BatchState, RecurrentOps, absorb_inputs, check_state, extend_inputs, state_dtype
from gsa_core.registry import StrategyParams

#: A visible row whose total, relative to its stabiliser, is below ``e^-INTRA_MARGIN`` is recomputed
#: in log space (fp32 normals reach ``e^-87``; ``(C+1)·K <= e^{8.4}`` for 64x64).
INTRA_MARGIN = 60.0
_MIN_ROW_TOTAL = math.exp(-INTRA_MARGIN)
#: Most chunks per block (the differentiable path's closed-form recurrence is quadratic in it).
_MAX_BLOCK_CHUNKS = 128


class KernelParams(StrategyParams):
    chunk_size: int = Field(64, ge=1, description="tokens per chunk of the causal recurrence")
    block_rows: int = Field(
        1 << 13, ge=1,
        description="batch·heads·tokens processed together (bounds the working set so it stays in cache)",
    )


@dataclass
class KernelState(BatchState):
    """The recurrent state: ``z [B, H, K]`` (log-normaliser per splat) and ``M [B, H, K, d_v]``.

    ``M`` is the normalised memory (a convex combination of the values seen so far); its size never
    depends on the sequence length. Rows stack and split (:class:`gsa_core.recurrent.BatchState`).
    """

    z: Tensor
    M: Tensor


# ----------------------------------------------------------------------------- helpers
def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``log(e^a + e^b)``: ``-inf`` with zero gradient when both are ``-inf``."""
    return safe_logsumexp(torch.stack((a, b)), dim=0)


def _pad_tokens(x: Tensor, length: int, value: float) -> Tensor:
    """Pad dim -2 of ``x`` to ``length`` with ``value``."""
    extra = length - x.shape[-2]
    return x if extra == 0 else F.pad(x, (0, 0, 0, extra), value=value)


def _absorb(z: Tensor, M: Tensor, lk: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Add keys ``lk [B, H, n, K]`` with values ``v [B, H, n, dv]`` to the state (order-free).

    One exp pass: ``Q = exp(lk - mk)`` with ``mk`` the per-splat max over these keys gives both the
    block's log-normaliser ``mk + log Σ Q`` and its memory ``Qᵀ v``.
    """
    mk = lk.detach().amax(dim=-2)  # [B, H, K]; -inf: no visible key for the splat
    has = torch.isfinite(mk)
    mk_ref = torch.where(has, mk, torch.zeros_like(mk))
    q_feat = torch.exp(lk - mk_ref.unsqueeze(-2))  # <= 1
    sq = q_feat.sum(dim=-2)
    zb = torch.where(has, mk_ref + torch.log(torch.where(has, sq, torch.ones_like(sq))), NEG_INF)
    z_new = _logaddexp(z, zb)
    z_ref = _finite_or_zero(z_new)
    alpha = torch.exp(z - z_ref)  # <= 1; 0 where z = -inf
    beta = torch.exp(mk - z_ref)  # <= 1; 0 where mk = -inf
    return z_new, alpha.unsqueeze(-1) * M + beta.unsqueeze(-1) * (q_feat.transpose(-1, -2) @ v)


def _readout(lq: Tensor, z: Tensor, M: Tensor) -> Tensor:
    """``o_t = Σ_s softmax_s(lq_ts + z_s) M_s``: ``[B, H, n, K]`` -> ``[B, H, n, dv]``."""
    return safe_softmax(lq + z.unsqueeze(-2), dim=-1) @ M


def _exact_rows(lq_rows: Tensor, lk_rows: Tensor, t: Tensor) -> Tensor:
    """Log pair weights of a few rows in log space: ``[m, K] x [m, C, K] -> [m, C]``, causal at ``t``."""
    logw = safe_logsumexp(lq_rows.unsqueeze(-2) + lk_rows, dim=-1)
    cols = torch.arange(lk_rows.shape[-2], device=lk_rows.device)
    return logw.masked_fill(cols.unsqueeze(0) > t.unsqueeze(1), NEG_INF)


def _causal_chunks(
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
    small = den.detach() < _MIN_ROW_TOTAL  # no visible key (den = 0, num = 0), or recomputed below
    out = num / torch.where(small, torch.ones_like(den), den)
    flag = seen.reshape(x, nc, c) & small.squeeze(-1)
    if bool(flag.any()):
        xi, ci, ti = flag.nonzero(as_tuple=True)
        rows = _exact_causal_rows(lqc[xi, ci, ti], lkc[xi, ci], ti, vc[xi, ci], zb[xi, ci], mb[xi, ci])
        out = out.index_put((xi, ci, ti), rows)
    return out.reshape(b, h, s, dv), z_all[:, -1].reshape(b, h, k), m_all[:, -1].reshape(b, h, k, dv)


class _Workspace:
    """Buffers reused from block to block: fresh large allocations cost page faults on every block."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


_THREAD_LOCAL = threading.local()


def _workspace() -> _Workspace:
    """This thread's workspace (kept between calls; its size is bounded by ``block_rows``)."""
    ws = getattr(_THREAD_LOCAL, "workspace", None)
    if ws is None:
        ws = _THREAD_LOCAL.workspace = _Workspace()
    return ws


@torch.no_grad()
def _causal_chunks_inplace(
    lq: Tensor, lk: Tensor, v: Tensor, z: Tensor, M: Tensor, chunk: int, seen: Tensor, out: Tensor,
    ws: _Workspace,
) -> tuple[Tensor, Tensor]:
    """:func:`_causal_chunks` without autograd, in place and in reused buffers, with one exp pass per side.

    The same exact arithmetic, rearranged: per chunk and splat ``c_s = max(mk_s, z_s)`` (this chunk's
    key max and the incoming state's log-normaliser) gives one query factor
    ``E_ts = exp(lq_ts + c_s - R_t)``, ``R_t = max_s(lq_ts + c_s)``, shared by both terms:
    intra-chunk ``w_tj / e^{R_t} = Σ_s E_ts Q_js e^{mk_s - c_s}`` and past
    ``Σ_s e^{lq_ts + z_s - R_t} M_s = Σ_s E_ts (e^{z_s - c_s} M_s)``. Every factor is ``<= 1`` and
    at least the product it contributes to, so every term within ``e^-87`` of ``e^{R_t}`` is exact; a
    row whose visible total falls below ``e^{-INTRA_MARGIN}`` (``R_t`` set by a much larger future key
    of the chunk) is recomputed in log space. ``seen [B·H, S]`` marks rows with any visible key.
    Writes the first ``out.shape[-2]`` outputs into ``out [B, H, <= S, dv]`` and returns the state.
    """
    b, h, s, k = lq.shape
    dv = v.shape[-1]
    nc, c = s // chunk, chunk
    x = b * h
    lqc = lq.reshape(x, nc, c, k)
    lkc = lk.reshape(x, nc, c, k)
    vc = v.view(x * nc, c, dv) if v.is_contiguous() else ws.get("v", (b, h, s, dv), v).copy_(v).view(x * nc, c, dv)

    # keys: Q = exp(lk - mk) <= 1, the chunks' log-normalisers and memories (all chunks at once)
    mk = lkc.amax(dim=-2)  # [x, nc, K]; -inf: no key of the chunk for that splat
    mk_ref = torch.nan_to_num(mk, neginf=0.0)
    q_feat = torch.sub(lkc, mk_ref.unsqueeze(-2), out=ws.get("q", (x, nc, c, k), lq)).exp_()
    zc = q_feat.sum(dim=-2).log_().add_(mk)  # log 0 + (-inf) = -inf
    q3 = q_feat.view(x * nc, c, k)
    u = torch.bmm(q3.transpose(1, 2), vc, out=ws.get("u", (x * nc, k, dv), lq)).view(x, nc, k, dv)

    # the state before every chunk: z by a prefix log-sum-exp, M by the recurrence (cheap loops)
    z_all = torch.empty(x, nc + 1, k, dtype=lq.dtype, device=lq.device)  # [x, nc + 1, K]
    z_all[:, 0] = z.reshape(x, k)
    for i in range(nc):  # a prefix log-sum-exp (cheaper than logcumsumexp for a few chunks)
        torch.logaddexp(z_all[:, i], zc[:, i], out=z_all[:, i + 1])
    z_ref = torch.nan_to_num(z_all[:, 1:], neginf=0.0)
    alpha = (z_all[:, :-1] - z_ref).exp_().unsqueeze(-1)  # exp(z_prev - z_new) <= 1
    beta = (mk - z_ref).exp_().unsqueeze(-1)  # exp(mk - z_new) <= 1
    mb = ws.get("mb", (x, nc, k, dv), lq)  # M before every chunk
    mb[:, 0] = M.reshape(x, k, dv)
    for i in range(1, nc):
        torch.mul(mb[:, i - 1], alpha[:, i - 1], out=mb[:, i]).addcmul_(beta[:, i - 1], u[:, i - 1])
    m_last = torch.mul(mb[:, -1], alpha[:, -1]).addcmul_(beta[:, -1], u[:, -1])
    zb = z_all[:, :-1]  # [x, nc, K]

    # one shared per-splat offset and one query factor for both terms
    cs = torch.maximum(mk, zb)
    cs_ref = torch.nan_to_num(cs, neginf=0.0)
    q_feat.mul_((mk - cs_ref).exp_().unsqueeze(-2))  # Q e^{mk - c} <= 1
    e_past = (zb - cs_ref).exp_()  # [x, nc, K], <= 1
    m_scaled = torch.mul(mb, e_past.unsqueeze(-1), out=ws.get("ms", (x, nc, k, dv), lq))
    e_feat = torch.add(lqc, cs.unsqueeze(-2), out=ws.get("e", (x, nc, c, k), lq))
    row = torch.nan_to_num(e_feat.amax(dim=-1, keepdim=True), neginf=0.0)  # R_t
    e3 = e_feat.sub_(row).exp_().view(x * nc, c, k)
    g = torch.bmm(e3, q3.transpose(1, 2), out=ws.get("g", (x * nc, c, c), lq)).tril_()
    den = torch.mul(e3, e_past.view(x * nc, 1, k)).sum(-1, keepdim=True).add_(g.sum(-1, keepdim=True))
    num = torch.bmm(g, vc, out=ws.get("num", (x * nc, c, dv), lq))
    num.baddbmm_(e3, m_scaled.view(x * nc, k, dv))
    small = den < _MIN_ROW_TOTAL  # no visible key (den = 0, num = 0), or recomputed below
    flag = seen.view(x * nc, c, 1) & small
    length = out.shape[-2]
    den = den.masked_fill_(small, 1.0).view(b, h, s, 1)[..., :length, :]
    torch.div(num.view(b, h, s, dv)[..., :length, :], den, out=out)
    if bool(flag.any()):
        xi, ci, ti = flag.view(x, nc, c).nonzero(as_tuple=True)
        rows = _exact_causal_rows(lqc[xi, ci, ti], lkc[xi, ci], ti, vc.view(x, nc, c, dv)[xi, ci],
                                  zb[xi, ci], mb[xi, ci])
        tok = ci * c + ti
        keep = tok < length
        out[(xi // h)[keep], (xi % h)[keep], tok[keep]] = rows[keep]
    return z_all[:, -1].reshape(b, h, k), m_last.reshape(b, h, k, dv)


def _exact_causal_rows(lq_rows: Tensor, lk_rows: Tensor, t: Tensor, v_rows: Tensor, z_rows: Tensor,
                       m_rows: Tensor) -> Tensor:
    """Outputs of a few causal rows in log space: intra-chunk keys ``<= t`` plus the incoming state.

    ``lq_rows [m, K]``, ``lk_rows [m, C, K]``, ``t [m]``, ``v_rows [m, C, dv]``, ``z_rows [m, K]``,
    ``m_rows [m, K, dv]`` -> ``[m, dv]``.
    """
    logw = _exact_rows(lq_rows, lk_rows, t)  # [m, C]
    a_past = lq_rows + z_rows  # [m, K]
    ref = finite_max(torch.cat((logw, a_past), dim=-1), dim=-1)
    w, p = torch.exp(logw - ref), torch.exp(a_past - ref)
    num = (w.unsqueeze(-2) @ v_rows + p.unsqueeze(-2) @ m_rows).squeeze(-2)
    den = w.sum(-1, keepdim=True) + p.sum(-1, keepdim=True)
    return num / torch.where(den > 0, den, torch.ones_like(den))


# ----------------------------------------------------------------------------- the backend
class KernelBackend(RecurrentOps):
    """Exact chunked linear-attention form of GSA: long sequences and constant-memory decoding."""

    name = "kernel"
    supported_masks = frozenset({"causal", "key_padding", "query_padding", "cross"})

    def __init__(self, params: KernelParams | None = None) -> None:
        self.params = params or KernelParams()

    # ------------------------------------------------------------------ checks
    def _check(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"expected q, k, v of shape [B, H, n, d], got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        batch, _, n_q, _ = q.shape
        n_k = k.shape[-2]
        if v.shape[-2] != n_k:
            raise ValueError(f"k and v must have the same length, got {n_k} and {v.shape[-2]}")
        unsupported = mask.kinds(n_q, n_k) - self.supported_masks
        if unsupported:
            raise MaskNotSupportedError(
                f"backend {self.name!r} cannot serve mask kind(s) {', '.join(sorted(unsupported))}; "
                f"it supports {', '.join(sorted(self.supported_masks))} (use 'dense' for windowed or "
                f"arbitrary masks)"
            )
        mask.check_shapes(batch, n_q, n_k)
        check_finite(q=q, k=k, v=v)

    def _check_state(self, state: KernelState, bank: SplatBank, batch: int, heads: int, value_dim: int) -> None:
        want = (batch, heads, bank.capacity)
        check_state(state, KernelState, self.name, {"z": want, "M": (*want, value_dim)})

    def _block_tokens(self, batch: int, heads: int) -> int:
        """Tokens per block: ``block_rows`` over batch·heads, whole chunks, at most :data:`_MAX_BLOCK_CHUNKS`."""
        c = self.params.chunk_size
        return c * min(_MAX_BLOCK_CHUNKS, max(1, self.params.block_rows // max(1, batch * heads) // c))

    @staticmethod
    def _seen(key_padding: Tensor | None, sl: slice, z: Tensor, padded: int) -> Tensor:
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

    @staticmethod
    def _key_features(bank: SplatBank, k: Tensor, key_padding: Tensor | None) -> Tensor:
        lk = bank.log_features(k)
        if key_padding is not None:
            lk = lk.masked_fill(~key_padding[:, None, :, None].to(lk.device), NEG_INF)
        return lk

    # ------------------------------------------------------------------ AttentionBackend
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        self._check(q, k, v, mask)
        if mask.causal:
            out, _ = self.causal_attention(q, k, v, bank, mask)
        else:  # the state over every key, read by every query
            state = self.absorb(k, v, bank, self.init_state(bank, q.shape[0], v.shape[-1], q.device), mask.key_padding)
            step = self._block_tokens(q.shape[0], q.shape[1])
            z, M = state.z.to(compute_dtype(q)), state.M.to(compute_dtype(q))
            outs = [_readout(bank.log_features(q[..., s:s + step, :]), z, M) for s in range(0, q.shape[-2], step)]
            out = torch.cat(outs, dim=-2) if outs else M.new_zeros(*q.shape[:-1], v.shape[-1])
            if mask.query_padding is not None:
                out = torch.where(mask.query_padding[:, None, :, None].to(out.device), out, torch.zeros_like(out))
        return out.to(v.dtype), {"backend": self.name, "chunk_size": self.params.chunk_size}

    def flops(self, batch: int, heads: int, n_q: int, n_k: int, head_dim: int, value_dim: int, causal: bool,
              bank: SplatBank) -> float:
        """Log-features of q and k; causal: per token ``u = Qᵀ V``, the intra-chunk ``[C, C]`` weights and their
        ``@ V``, and the past-state readout; otherwise the state over the keys and one readout per query."""
        k, c = bank.capacity, self.params.chunk_size
        per = feature_flops(bank, n_q + n_k)
        if causal:
            per += n_q * (4 * k * value_dim + 2 * c * (k + value_dim))
            per += 2 * k * value_dim * max(0, n_k - n_q)  # keys absorbed before the queries
        else:
            per += 2 * n_k * k * value_dim + 2 * n_q * k * value_dim
        return float(batch * heads * per)

    # ------------------------------------------------------------------ RecurrentBackend
    def init_state(self, bank: SplatBank, batch: int, value_dim: int, device: torch.device) -> KernelState:
        dtype = state_dtype(bank)
        h, k = bank.n_heads, bank.capacity
        return KernelState(z=torch.full((batch, h, k), NEG_INF, device=device, dtype=dtype),
                           M=torch.zeros(batch, h, k, value_dim, device=device, dtype=dtype))

    def extend(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: KernelState,
               mask: MaskSpec | None = None) -> tuple[Tensor, KernelState]:
        """Causal attention of ``n`` new aligned tokens continuing ``state`` (see ``RecurrentBackend``).

        One token: the state update and readout in a few ops (decoding). More: the chunked recurrence,
        in blocks of ``block_rows``, with the same arithmetic as a causal ``forward``.
        """
        key_padding, query_padding = extend_inputs(q, k, v, mask, self.name)
        batch, heads, n, _ = q.shape
        self._check_state(state, bank, batch, heads, v.shape[-1])
        if n == 0:
            return v.new_zeros(batch, heads, 0, v.shape[-1]), state
        if n == 1:
            out, state = self._one_token(q, k, v, bank, state, key_padding)
        else:
            out, state = self._chunked(q, k, v, bank, key_padding, state)
        if query_padding is not None:
            out = torch.where(query_padding[:, None, :, None].to(out.device), out, torch.zeros_like(out))
        return out.to(v.dtype), state

    def absorb(self, k: Tensor, v: Tensor, bank: SplatBank, state: KernelState,
               key_padding: Tensor | None = None) -> KernelState:
        """Fold keys ``k [B, H, n, d]`` with values ``v`` into ``state`` (order-free), in blocks."""
        absorb_inputs(k, v, key_padding, self.name)
        self._check_state(state, bank, k.shape[0], k.shape[1], v.shape[-1])
        z, M = state.z, state.M
        step = self._block_tokens(k.shape[0], k.shape[1])
        for start in range(0, k.shape[-2], step):
            sl = slice(start, start + step)
            lk = self._key_features(bank, k[..., sl, :], None if key_padding is None else key_padding[:, sl])
            z, M = _absorb(z.to(lk.dtype), M.to(lk.dtype), lk, v[..., sl, :].to(lk.dtype))
        return KernelState(z, M)

    def readout(self, q: Tensor, bank: SplatBank, state: KernelState) -> tuple[Tensor, Tensor]:
        """Attention of ``q [B, H, n, d]`` to the state's keys: ``(out [B, H, n, d_v], lse [B, H, n])`` in the
        compute dtype; ``lse = logsumexp_s(l_s(q) + z_s)`` is the log of the total weight."""
        self._check_state(state, bank, q.shape[0], q.shape[1], state.M.shape[-1])
        check_finite(q=q)
        dtype = compute_dtype(q)
        z, M = state.z.to(dtype), state.M.to(dtype)
        step = self._block_tokens(q.shape[0], q.shape[1])
        outs, lses = [], []
        for start in range(0, q.shape[-2], step):
            lse, p = safe_lse_softmax(bank.log_features(q[..., start:start + step, :]) + z.unsqueeze(-2))
            outs.append(p @ M)
            lses.append(lse)
        if not outs:
            return M.new_zeros(*q.shape[:-1], M.shape[-1]), z.new_zeros(q.shape[:-1])
        return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)

    # ------------------------------------------------------------------ the two extend paths
    @staticmethod
    def _one_token(q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: KernelState,
                   key_padding: Tensor | None) -> tuple[Tensor, KernelState]:
        lqk = bank.log_features(torch.cat((q, k.to(q.dtype)), dim=-2))  # one bank call for both
        lq, lk = lqk[..., :1, :], lqk[..., 1:, :]
        if key_padding is not None:
            lk = lk.masked_fill(~key_padding[:, None, :, None].to(lk.device), NEG_INF)
        z, M = state.z.to(lq.dtype), state.M.to(lq.dtype)
        vf, lk1 = v.to(lq.dtype), lk.squeeze(-2)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (lqk, vf, z, M)):
            z_new = _logaddexp(z, lk1)
            z_ref = _finite_or_zero(z_new)
            alpha, beta = torch.exp(z - z_ref), torch.exp(lk1 - z_ref)  # <= 1
            m_new = alpha.unsqueeze(-1) * M + beta.unsqueeze(-1) * vf  # [B, H, K, dv]
            out = _readout(lq, z_new, m_new)
        else:  # decoding: the same arithmetic in fewer ops
            z_new = torch.logaddexp(z, lk1)
            z_ref = torch.nan_to_num(z_new, neginf=0.0)
            alpha, beta = (z - z_ref).exp_().unsqueeze(-1), (lk1 - z_ref).exp_().unsqueeze(-1)
            m_new = torch.mul(M, alpha).addcmul_(beta, vf)
            logits = lq + z_new.unsqueeze(-2)
            p = logits.sub_(torch.nan_to_num(logits.amax(-1, keepdim=True), neginf=0.0)).exp_()
            out = (p @ m_new).div_(p.sum(-1, keepdim=True).clamp_(min=torch.finfo(p.dtype).tiny))
        if key_padding is not None:  # padded tokens leave the state bit-identical
            real = key_padding[:, 0].to(z.device)[:, None, None]
            z_new = torch.where(real, z_new, z)
            m_new = torch.where(real.unsqueeze(-1), m_new, M)
        return out, KernelState(z_new, m_new)

    def _chunked(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, key_padding: Tensor | None,
                 state: KernelState) -> tuple[Tensor, KernelState]:
        """Causal attention of aligned ``q, k, v [B, H, n, ·]`` (query ``i`` sees keys ``<= i``) in chunks."""
        c = self.params.chunk_size
        step = self._block_tokens(q.shape[0], q.shape[1])
        z, M = state.z, state.M
        n = q.shape[-2]
        tracked = torch.is_grad_enabled() and (
            any(t.requires_grad for t in (q, k, v, z, M)) or any(p.requires_grad for p in bank.parameters())
        )
        outs: list[Tensor] = []
        if not tracked:
            ws = _workspace()
            result = torch.empty(*q.shape[:2], n, v.shape[-1], dtype=compute_dtype(q), device=q.device)
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            lq = bank.log_features(q[..., sl, :])
            lk = self._key_features(bank, k[..., sl, :], None if key_padding is None else key_padding[:, sl])
            vb = v[..., sl, :].to(lq.dtype)
            z, M = z.to(lq.dtype), M.to(lq.dtype)
            length = lq.shape[-2]
            padded = -(-length // c) * c
            if padded != length:
                lq, lk = _pad_tokens(lq, padded, NEG_INF), _pad_tokens(lk, padded, NEG_INF)
                vb = _pad_tokens(vb, padded, 0.0)
            seen = self._seen(key_padding, sl, z, padded)
            if tracked:
                out, z, M = _causal_chunks(lq, lk, vb, z, M, c, seen)
                outs.append(out[..., :length, :])
            else:
                z, M = _causal_chunks_inplace(lq, lk, vb, z, M, c, seen, result[..., sl, :], ws)
        if tracked:
            result = torch.cat(outs, dim=-2)
        return result, KernelState(z, M)
