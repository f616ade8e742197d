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
  before normalising (see :mod:`gsa_plugins.backends.kernel_chunked` for the exact arithmetic);
- every stabiliser is a max over one chunk, one row or one splat's keys of a chunk, never over the
  whole sequence, so causal outputs never depend on later chunks and prefill-then-decode equals one
  forward. A row whose chunk stabiliser was set by a much larger *future* key of the same chunk (so
  that its visible terms could underflow) is detected and recomputed in log space.

Heavy work is batched matmuls over all chunks of a block; only the ``O(K·d)`` state recurrence runs
as a Python loop over chunks. The log-features of each block are one GEMM against the bank's
constants, derived once per call (:meth:`gsa_core.bank.SplatBank.feature_map`). The causal path runs in
place, in buffers reused from block to block, and trains through a ``torch.autograd.Function`` with a
hand-derived backward that recomputes each block instead of saving it
(:class:`gsa_plugins.backends.kernel_chunked.CausalKernel`; ``kernel_naive`` holds the autograd
reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank, compute_dtype
from gsa_core.errors import MaskNotSupportedError
from gsa_core.flops import feature_flops
from gsa_core.masks import MaskSpec
from gsa_core.numerics import NEG_INF, check_finite, safe_logsumexp, safe_lse_softmax, safe_softmax
from gsa_core.recurrent import BatchState, RecurrentOps, absorb_inputs, check_state, extend_inputs, state_dtype
from gsa_core.registry import StrategyParams
from gsa_plugins.backends.kernel_chunked import Plan, causal_kernel

#: Most chunks per block (the reference path's closed-form recurrence is quadratic in it).
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
    def _key_features(features: Callable[[Tensor], Tensor], k: Tensor, key_padding: Tensor | None) -> Tensor:
        lk = features(k)
        if key_padding is not None:
            lk = lk.masked_fill(~key_padding[:, None, :, None].to(lk.device), NEG_INF)
        return lk

    # ------------------------------------------------------------------ AttentionBackend
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        self._check(q, k, v, mask)
        n_q, n_k = q.shape[-2], k.shape[-2]
        if mask.causal and n_q == n_k > 1 and mask.offset(n_q, n_k) == 0:  # aligned: inputs checked once, above
            state = self.init_state(bank, q.shape[0], v.shape[-1], q.device)
            out, _ = self._chunked(q, k, v, bank, mask.key_padding, state)
            if mask.query_padding is not None:
                out = torch.where(mask.query_padding[:, None, :, None].to(out.device), out, torch.zeros_like(out))
        elif mask.causal:
            out, _ = self.causal_attention(q, k, v, bank, mask)
        else:  # the state over every key, read by every query
            state = self.absorb(k, v, bank, self.init_state(bank, q.shape[0], v.shape[-1], q.device), mask.key_padding)
            step = self._block_tokens(q.shape[0], q.shape[1])
            z, M = state.z.to(compute_dtype(q)), state.M.to(compute_dtype(q))
            fmap = bank.feature_map(compute_dtype(q))
            outs = [_readout(fmap(q[..., s:s + step, :]), z, M) for s in range(0, q.shape[-2], step)]
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
        fmap = bank.feature_map(compute_dtype(k)) if k.shape[-2] > 1 else bank.log_features
        for start in range(0, k.shape[-2], step):
            sl = slice(start, start + step)
            lk = self._key_features(fmap, k[..., sl, :], None if key_padding is None else key_padding[:, sl])
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
        fmap = bank.feature_map(dtype) if q.shape[-2] > 1 else bank.log_features
        outs, lses = [], []
        for start in range(0, q.shape[-2], step):
            lse, p = safe_lse_softmax(fmap(q[..., start:start + step, :]) + z.unsqueeze(-2))
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
        fmap = bank.feature_map(compute_dtype(q))
        plan = Plan(fmap.kind, fmap.centre, fmap.alive, self.params.chunk_size,
                    self._block_tokens(q.shape[0], q.shape[1]), key_padding)
        out, z, M = causal_kernel(plan, fmap, q, k, v, state.z, state.M)
        return out, KernelState(z, M)
