"""``sparse``: every token keeps only its top-k splats; ``O(n·k·L·d_v)`` after the features (``L = 16``).

Semantics. For each query and each key, the ``k`` largest log-features are kept (ties go to the lower
slot index) and the others become ``-inf``; attention is then exactly GSA (DESIGN.md section 1) with
those sparsified features. With ``k >=`` the number of alive slots this equals ``dense``.

Algorithm. Each kept ``(token, splat)`` pair of a key is an *event* ``(splat, time, l, v)``. Per splat
the running state of DESIGN.md section 2 is ``z_s(t) = logsumexp_{j<=t} l_s(k_j)`` and the normalised
memory ``M_s(t) = sum_j exp(l_s(k_j) - z_s(t)) v_j``, and ``o_t = sum_{s in top-k(q_t)}
softmax_s(l_s(q_t) + z_s(t)) M_s(t)``.

- non-causal: ``z`` and ``M`` over all keys are a scatter-logsumexp and a scatter-add into ``K`` bins.
- causal: events are sorted by ``(splat, time)`` (one sort of ``n·k`` integers), then an inclusive
  *segmented* prefix scan computes ``(z, M)`` after every event, in log space and exactly: tiles of
  ``L`` events take a dense ``[L, L]`` masked log-space block, and the state of the segment running
  into each tile is carried by the same scan applied recursively to the tiles' tails, merged with
  ``exp(z_old - z_new) <= 1`` weights. Each query event then finds the last key event of its splat
  at or before its position with ``searchsorted``. No max is ever taken over a whole sequence.

The features themselves (one matmul against all ``K`` centers) and the top-k selection are ``K``-wide;
nothing after them is, except the ``K``-bin buffers of the non-causal scatter and the recurrent state
(``[B, H, K]`` and ``[B, H, K, d_v]``, constant in sequence length). So the cost grows with ``k``, not
``K``; e.g. at ``K = 512``, ``n = 4096`` a forward with ``k = 8`` is ~60x cheaper than with ``k = K``.
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
from gsa_core.numerics import NEG_INF, check_finite, safe_lse_softmax, safe_softmax
from gsa_core.recurrent import BatchState, RecurrentOps, absorb_inputs, check_state, extend_inputs, state_dtype
from gsa_core.registry import StrategyParams


class SparseParams(StrategyParams):
    top_k: int = Field(8, ge=1, description="splats kept per token (query and key)")
    scan_block: int = Field(16, ge=2, description="events per tile of the causal segmented scan")


@dataclass
class SparseState(BatchState):
    """Per-splat running state for decoding: ``log_norm`` ``z [B, H, K]``, ``memory`` ``M [B, H, K, d_v]``.

    The same sufficient statistics as the kernel state, over the keys' top-k features only. It holds
    no token count: the state does not depend on where its keys were, so rows of sequences of any
    lengths stack (:class:`gsa_core.recurrent.BatchState`); positions are the caller's to keep.
    """

    log_norm: Tensor
    memory: Tensor


# ----------------------------------------------------------------------------- selection
def top_k_slots(logf: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest log-features of every row: ``(values [..., k], slot indices [..., k])``.

    Ties at the k-th value go to the lower slot index (decided on the detached values, so the
    selection is deterministic); values keep their gradient. Rows with fewer than ``k`` finite
    features also keep some ``-inf`` (dead) slots, which carry nothing. ``k >= K`` keeps every slot.
    """
    n_slots = logf.shape[-1]
    if k >= n_slots:
        idx = torch.arange(n_slots, device=logf.device).expand(logf.shape)
        return logf, idx
    with torch.no_grad():
        flat = logf.detach()
        vals, idx = flat.topk(k, dim=-1, sorted=False)
        kth = vals.amin(-1, keepdim=True)
        # A tie straddles the cut when more than k values reach the k-th; only those rows need the
        # (slower) stable sort. (topk(k + 1) would find them too, but is much slower for k = 8 on CPU.)
        tied = torch.isfinite(kth.squeeze(-1)) & ((flat >= kth).sum(-1) > k)
        if bool(tied.any()):
            stable = torch.sort(flat[tied], dim=-1, descending=True, stable=True).indices[..., :k]
            idx = idx.clone()
            idx[tied] = stable
    return logf.gather(-1, idx), idx


# ----------------------------------------------------------------------------- log-space merges
def _merge_weights(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``z = logaddexp(z1, z2)`` and the weights ``e^{z1-z}``, ``e^{z2-z}`` (both 0 when ``z = -inf``).

    Either input may be ``-inf`` (an empty state); results and gradients stay finite.
    """
    m = torch.maximum(z1, z2).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a1, a2 = torch.exp(z1 - m), torch.exp(z2 - m)
    s = a1 + a2
    pos = s > 0
    s_safe = torch.where(pos, s, torch.ones_like(s))
    return torch.where(pos, torch.log(s_safe) + m, NEG_INF), a1 / s_safe, a2 / s_safe


def _merge(z1: Tensor, u1: Tensor, z2: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two normalised states ``(z, u [..., d_v])``: ``u = e^{z1-z} u1 + e^{z2-z} u2``."""
    z, w1, w2 = _merge_weights(z1, z2)
    return z, w1.unsqueeze(-1) * u1 + w2.unsqueeze(-1) * u2


def segmented_prefix(seg: Tensor, logit: Tensor, val: Tensor, block: int = 16) -> tuple[Tensor, Tensor]:
    """Inclusive segmented prefix in log space over a stream sorted by segment.

    ``seg [N]`` (non-decreasing ints), ``logit [N]`` (may be ``-inf``), ``val [N, d_v]`` ->
    ``z [N]`` with ``z_i = logsumexp_{j<=i, seg_j = seg_i} logit_j`` and ``u [N, d_v]`` with
    ``u_i = sum_{j<=i, seg_j = seg_i} exp(logit_j - z_i) val_j`` (zeros where ``z_i = -inf``).
    Cost ``O(N·block·d_v)``; depth ``log_block(N)``.
    """
    n, dv = val.shape
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        seg = torch.cat([seg, (seg[-1] + 1).expand(pad)])
        logit = torch.cat([logit, logit.new_full((pad,), NEG_INF)])
        val = torch.cat([val, val.new_zeros(pad, dv)])
    segb, lb, vb = seg.view(nb, block), logit.view(nb, block), val.view(nb, block, dv)
    tril = torch.ones(block, block, dtype=torch.bool, device=seg.device).tril()
    same = (segb.unsqueeze(-1) == segb.unsqueeze(-2)) & tril
    logits = lb.unsqueeze(-2).masked_fill(~same, NEG_INF)
    z, p = safe_lse_softmax(logits)
    u = p @ vb
    if nb > 1:
        tail_seg = segb[:, -1]
        cz, cu = segmented_prefix(tail_seg, z[:, -1], u[:, -1], block)
        # Only the segment of tile b-1's last event can run into tile b; its state there is the
        # prefix through that event (tile 0 gets an empty carry under a segment id below all others).
        carry_seg = torch.cat([segb[:1, 0] - 1, tail_seg[:-1]])
        hit = segb == carry_seg.unsqueeze(-1)
        carry_z = torch.where(hit, torch.cat([cz.new_full((1,), NEG_INF), cz[:-1]]).unsqueeze(-1), NEG_INF)
        carry_u = torch.cat([cu.new_zeros(1, dv), cu[:-1]]).unsqueeze(-2)
        z, w_carry, w_local = _merge_weights(carry_z, z)
        u = w_local.unsqueeze(-1) * u + w_carry.unsqueeze(-1) * carry_u
    return z.reshape(-1)[:n], u.reshape(-1, dv)[:n]


# ----------------------------------------------------------------------------- the backend
@dataclass
class _Selected:
    """Top-k features of queries and keys, with padded keys' features set to ``-inf``."""

    lq: Tensor  # [B, H, n_q, k]
    iq: Tensor
    lk: Tensor  # [B, H, n_k, k]
    ik: Tensor
    vf: Tensor  # [B, H, n_k, d_v] in the compute dtype


class SparseBackend(RecurrentOps):
    """Top-k sparse GSA: each token attends through its ``top_k`` best splats only."""

    name = "sparse"
    supported_masks = frozenset({"causal", "key_padding", "query_padding", "cross"})

    def __init__(self, params: SparseParams | None = None) -> None:
        self.params = params or SparseParams()

    def is_exact(self, bank: SplatBank) -> bool:
        """Whether this backend equals ``dense`` for ``bank`` (``top_k`` >= alive slots of every head)."""
        return self.params.top_k >= int(bank.alive.sum(-1).max().item())

    # ------------------------------------------------------------------ helpers
    def _check(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"sparse expects q, k, v as [B, H, n, d]; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
            raise ValueError(f"mismatched q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        unsupported = mask.kinds(q.shape[-2], k.shape[-2]) - self.supported_masks
        if unsupported:
            raise MaskNotSupportedError(
                f"the sparse backend cannot serve mask kind(s) {', '.join(sorted(unsupported))}; it supports "
                f"{', '.join(sorted(self.supported_masks))} (use dense for windows and arbitrary masks)"
            )
        mask.check_shapes(q.shape[0], q.shape[-2], k.shape[-2])
        check_finite(q=q, k=k, v=v)

    def _check_state(self, state: SparseState, bank: SplatBank, batch: int, heads: int, value_dim: int) -> None:
        want = (batch, heads, bank.capacity)
        check_state(state, SparseState, self.name, {"log_norm": want, "memory": (*want, value_dim)})

    @staticmethod
    def _features(bank: SplatBank, x: Tensor) -> Callable[[Tensor], Tensor]:
        """The log-feature function for a call: with many splats, the bank's constants derived once and one
        GEMM per input (:meth:`SplatBank.feature_map`; measured 1.7x faster forward at K=512, d=64, n=4096);
        with ``K`` below the augmented width (``2d``: K=64, d=64 measured ~10% slower, the whole-sequence
        ``[n, 2d]`` input outweighs the ``[n, K]`` passes it saves) or a single token (decoding: deriving
        the constants costs more than the features), :meth:`SplatBank.log_features`."""
        if x.shape[-2] <= 1 or bank.capacity <= 2 * bank.head_dim:
            return bank.log_features
        return bank.feature_map(compute_dtype(x))

    def _select_keys(self, k: Tensor, bank: SplatBank, key_padding: Tensor | None,
                     features: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        lk, ik = top_k_slots((features or self._features(bank, k))(k), self.params.top_k)
        if key_padding is not None:  # mask the key features, not the values
            lk = lk.masked_fill(~key_padding.to(lk.device)[:, None, :, None], NEG_INF)
        return lk, ik

    def _select(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, key_padding: Tensor | None) -> _Selected:
        features = self._features(bank, q if q.shape[-2] > 1 else k)
        lq, iq = top_k_slots(features(q), self.params.top_k)
        lk, ik = self._select_keys(k, bank, key_padding, features)
        return _Selected(lq, iq, lk, ik, v.to(lq.dtype))

    @staticmethod
    def _bins(sel: _Selected, capacity: int) -> tuple[Tensor, Tensor]:
        """Global bin ``(b, h, slot)`` of every query and key event."""
        batch, heads = sel.lk.shape[:2]
        base = (torch.arange(batch * heads, device=sel.ik.device) * capacity).view(batch, heads, 1, 1)
        return base + sel.iq, base + sel.ik

    @staticmethod
    def _totals(lk: Tensor, vf: Tensor, bins_k: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
        """``(z, M)`` over all keys per bin: scatter-logsumexp and scatter-add, ``[n_bins]``, ``[n_bins, d_v]``."""
        dv = vf.shape[-1]
        flat_bins, flat_l = bins_k.reshape(-1), lk.reshape(-1)
        m = flat_l.new_full((n_bins,), NEG_INF).scatter_reduce(0, flat_bins, flat_l.detach(), "amax")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(lk - m[bins_k])  # [B, H, n_k, k]
        s = flat_l.new_zeros(n_bins).index_add(0, flat_bins, e.reshape(-1))
        w = (e.unsqueeze(-1) * vf.unsqueeze(-2)).reshape(-1, dv)
        acc = flat_l.new_zeros(n_bins, dv).index_add(0, flat_bins, w)
        pos = s > 0
        s_safe = torch.where(pos, s, torch.ones_like(s))
        return torch.where(pos, torch.log(s_safe) + m, NEG_INF), acc / s_safe.unsqueeze(-1)

    @staticmethod
    def _readout(lq: Tensor, zq: Tensor, uq: Tensor) -> Tensor:
        """``o = sum_a softmax_a(lq_a + z_a) u_a``: ``[..., k]``, ``[..., k]``, ``[..., k, d_v]`` -> ``[..., d_v]``."""
        p = safe_softmax(lq + zq, dim=-1)
        return (p.unsqueeze(-1) * uq).sum(-2)  # not a batched [1, k] @ [k, d_v] matmul: far slower on CPU

    def _causal_reads(self, sel: _Selected, bins_q: Tensor, bins_k: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """``(z, u)`` each query event reads: the running state of its splat after the keys it sees."""
        batch, heads, n_k, top = sel.lk.shape
        n_q = sel.lq.shape[-2]
        dv = sel.vf.shape[-1]
        dev = bins_k.device
        # Sort key events by (bin, time); keys are unique because each token's slots are distinct.
        key = bins_k * n_k + torch.arange(n_k, device=dev).view(1, 1, n_k, 1)
        order = key.reshape(-1).argsort()
        sorted_key = key.reshape(-1)[order]
        sorted_bin = sorted_key // n_k
        token = order // top  # flat (b, h, j) index of each sorted event
        z, u = segmented_prefix(sorted_bin, sel.lk.reshape(-1)[order], sel.vf.reshape(-1, dv)[token],
                                self.params.scan_block)
        # Each query event reads the last key event of its bin at or before its position.
        pos = (torch.arange(n_q, device=dev) + offset).clamp(-1, n_k - 1).view(1, 1, n_q, 1)
        found = torch.searchsorted(sorted_key, (bins_q * n_k + pos).reshape(-1), right=True) - 1
        safe = found.clamp_min(0)
        valid = (found >= 0) & (sorted_bin[safe] == bins_q.reshape(-1)) & (pos >= 0).expand_as(bins_q).reshape(-1)
        zq = torch.where(valid, z[safe], NEG_INF).view(batch, heads, n_q, top)
        uq = u[safe].view(batch, heads, n_q, top, dv)  # finite; invalid reads get weight 0 from zq = -inf
        return zq, uq

    # ------------------------------------------------------------------ AttentionBackend
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        self._check(q, k, v, mask)
        batch, heads, n_q, _ = q.shape
        n_k, dv = k.shape[-2], v.shape[-1]
        sel = self._select(q, k, v, bank, mask.key_padding)
        if n_q == 0 or n_k == 0:
            return sel.vf.new_zeros(batch, heads, n_q, dv).to(v.dtype), {"backend": self.name,
                                                                          "top_k": self.params.top_k}
        bins_q, bins_k = self._bins(sel, bank.capacity)
        if mask.causal:
            zq, uq = self._causal_reads(sel, bins_q, bins_k, mask.offset(n_q, n_k))
        else:
            z, m = self._totals(sel.lk, sel.vf, bins_k, batch * heads * bank.capacity)
            zq, uq = z[bins_q], m[bins_q]
        out = self._readout(sel.lq, zq, uq)
        if mask.query_padding is not None:
            out = out * mask.query_padding[:, None, :, None].to(out)
        return out.to(v.dtype), {"backend": self.name, "top_k": self.params.top_k}

    def flops(self, batch: int, heads: int, n_q: int, n_k: int, head_dim: int, value_dim: int, causal: bool,
              bank: SplatBank) -> float:
        """Log-features against all ``K`` splats, the causal scan's ``[scan_block, scan_block]`` tiles times
        values over the ``n_k·top_k`` key events (one scatter pass otherwise), and the ``top_k`` readout."""
        top = min(self.params.top_k, bank.capacity)
        scan = 2 * n_k * top * (self.params.scan_block if causal else 1) * value_dim
        return float(batch * heads * (feature_flops(bank, n_q + n_k) + scan + 2 * n_q * top * value_dim))

    # ------------------------------------------------------------------ RecurrentBackend
    def init_state(self, bank: SplatBank, batch: int, value_dim: int, device: torch.device) -> SparseState:
        dtype = state_dtype(bank)
        shape = (batch, bank.n_heads, bank.capacity)
        return SparseState(
            log_norm=torch.full(shape, NEG_INF, dtype=dtype, device=device),
            memory=torch.zeros((*shape, value_dim), dtype=dtype, device=device),
        )

    @staticmethod
    def _merge_into(state: SparseState, z_add: Tensor, m_add: Tensor) -> SparseState:
        """``state`` with per-bin totals ``(z_add [n_bins], m_add [n_bins, d_v])`` merged in (absorbing keys)."""
        z0 = state.log_norm.reshape(-1).to(z_add.dtype)
        m0 = state.memory.reshape(-1, m_add.shape[-1]).to(m_add.dtype)
        z, m = _merge(z0, m0, z_add, m_add)
        return SparseState(z.view_as(state.log_norm), m.view_as(state.memory))

    def extend(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: SparseState,
               mask: MaskSpec | None = None) -> tuple[Tensor, SparseState]:
        """Causal attention of ``n`` new aligned tokens continuing ``state`` (see ``RecurrentBackend``).

        Each query event reads its splat's state merged with the block's causal prefix (the segmented
        scan of ``forward``); the new state is the old one merged with the block's per-splat totals.
        """
        key_padding, query_padding = extend_inputs(q, k, v, mask, self.name)
        batch, heads, n, _ = q.shape
        dv = v.shape[-1]
        self._check_state(state, bank, batch, heads, dv)
        if n == 0:
            return v.new_zeros(batch, heads, 0, dv), state
        sel = self._select(q, k, v, bank, key_padding)
        n_bins = batch * heads * bank.capacity
        bins_q, bins_k = self._bins(sel, bank.capacity)
        z0 = state.log_norm.reshape(-1).to(sel.lk.dtype)
        m0 = state.memory.reshape(n_bins, dv).to(sel.lk.dtype)
        if n == 1:  # a key sees itself only: its events are the block's whole prefix
            zs, us = sel.lk, sel.vf.unsqueeze(-2).expand(*sel.lk.shape, dv)
            z_new, m_new = _merge(z0[bins_k], m0[bins_k], zs, us)  # the k splats of the new key
            z_all, m_all = z0.scatter(0, bins_k.reshape(-1), z_new.reshape(-1)), m0.index_copy(
                0, bins_k.reshape(-1), m_new.reshape(-1, dv))
            zq, uq = z_all[bins_q], m_all[bins_q]
            new_state = SparseState(z_all.view_as(state.log_norm), m_all.view_as(state.memory))
        else:
            zs, us = self._causal_reads(sel, bins_q, bins_k, 0)
            zq, uq = _merge(z0[bins_q], m0[bins_q], zs, us)
            new_state = self._merge_into(state, *self._totals(sel.lk, sel.vf, bins_k, n_bins))
        out = self._readout(sel.lq, zq, uq)
        if query_padding is not None:
            out = out * query_padding[:, None, :, None].to(out)
        return out.to(v.dtype), new_state

    def absorb(self, k: Tensor, v: Tensor, bank: SplatBank, state: SparseState,
               key_padding: Tensor | None = None) -> SparseState:
        """Fold keys into ``state`` through their top-k splats (order-free)."""
        absorb_inputs(k, v, key_padding, self.name)
        batch, heads, n, _ = k.shape
        self._check_state(state, bank, batch, heads, v.shape[-1])
        if n == 0:
            return state
        lk, ik = self._select_keys(k, bank, key_padding)
        base = (torch.arange(batch * heads, device=ik.device) * bank.capacity).view(batch, heads, 1, 1)
        bins_k = base + ik
        return self._merge_into(state, *self._totals(lk, v.to(lk.dtype), bins_k, batch * heads * bank.capacity))

    def readout(self, q: Tensor, bank: SplatBank, state: SparseState) -> tuple[Tensor, Tensor]:
        """Attention of ``q`` to the state's keys through its top-k splats: ``(out, lse)`` in the compute dtype."""
        self._check_state(state, bank, q.shape[0], q.shape[1], state.memory.shape[-1])
        check_finite(q=q)
        lq, iq = top_k_slots(self._features(bank, q)(q), self.params.top_k)
        z, m = state.log_norm.to(lq.dtype), state.memory.to(lq.dtype)
        zq = z.gather(-1, iq.flatten(2)).view_as(iq)  # [B, H, n, k]
        uq = m.gather(-2, iq.flatten(2).unsqueeze(-1).expand(-1, -1, -1, m.shape[-1])).view(*iq.shape, m.shape[-1])
        lse, p = safe_lse_softmax(lq + zq)
        return (p.unsqueeze(-1) * uq).sum(-2), lse
