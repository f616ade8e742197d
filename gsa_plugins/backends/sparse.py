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

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.errors import MaskNotSupportedError
from gsa_core.masks import MaskSpec
from gsa_core.numerics import NEG_INF, finite_max, safe_softmax
from gsa_core.registry import StrategyParams


class SparseParams(StrategyParams):
    top_k: int = Field(8, ge=1, description="splats kept per token (query and key)")
    scan_block: int = Field(16, ge=2, description="events per tile of the causal segmented scan")


@dataclass
class SparseState:
    """Per-splat running state for decoding: ``log_norm`` ``z [B, H, K]``, ``memory`` ``M [B, H, K, d_v]``.

    ``length`` counts the key positions consumed so far (padded ones included).
    """

    log_norm: Tensor
    memory: Tensor
    length: int = 0


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


def _masked_lse_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(safe logsumexp, safe softmax)`` over the last dim with one exponential."""
    m = finite_max(logits, -1)
    e = torch.exp(logits - m)
    s = e.sum(-1, keepdim=True)
    pos = s > 0
    s_safe = torch.where(pos, s, torch.ones_like(s))
    lse = torch.where(pos, torch.log(s_safe) + m, NEG_INF).squeeze(-1)
    return lse, e / s_safe


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
    z, p = _masked_lse_softmax(logits)
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


class SparseBackend:
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

    def _select(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, key_padding: Tensor | None) -> _Selected:
        top_k = self.params.top_k
        lq, iq = top_k_slots(bank.log_features(q), top_k)
        lk, ik = top_k_slots(bank.log_features(k), top_k)
        if key_padding is not None:  # mask the key features, not the values
            lk = lk.masked_fill(~key_padding.to(lk.device)[:, None, :, None], NEG_INF)
        return _Selected(lq, iq, lk, ik, v.to(lq.dtype))

    @staticmethod
    def _bins(sel: _Selected, capacity: int) -> tuple[Tensor, Tensor]:
        """Global bin ``(b, h, slot)`` of every query and key event."""
        batch, heads = sel.lk.shape[:2]
        base = (torch.arange(batch * heads, device=sel.ik.device) * capacity).view(batch, heads, 1, 1)
        return base + sel.iq, base + sel.ik

    @staticmethod
    def _totals(sel: _Selected, bins_k: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
        """``(z, M)`` over all keys per bin: scatter-logsumexp and scatter-add, ``[n_bins]``, ``[n_bins, d_v]``."""
        dv = sel.vf.shape[-1]
        flat_bins, flat_l = bins_k.reshape(-1), sel.lk.reshape(-1)
        m = flat_l.new_full((n_bins,), NEG_INF).scatter_reduce(0, flat_bins, flat_l.detach(), "amax")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(sel.lk - m[bins_k])  # [B, H, n_k, k]
        s = flat_l.new_zeros(n_bins).index_add(0, flat_bins, e.reshape(-1))
        w = (e.unsqueeze(-1) * sel.vf.unsqueeze(-2)).reshape(-1, dv)
        acc = flat_l.new_zeros(n_bins, dv).index_add(0, flat_bins, w)
        pos = s > 0
        s_safe = torch.where(pos, s, torch.ones_like(s))
        return torch.where(pos, torch.log(s_safe) + m, NEG_INF), acc / s_safe.unsqueeze(-1)

    @staticmethod
    def _readout(lq: Tensor, zq: Tensor, uq: Tensor) -> Tensor:
        """``o = sum_a softmax_a(lq_a + z_a) u_a``: ``[..., k]``, ``[..., k]``, ``[..., k, d_v]`` -> ``[..., d_v]``."""
        p = safe_softmax(lq + zq, dim=-1)
        return (p.unsqueeze(-1) * uq).sum(-2)  # not a batched [1, k] @ [k, d_v] matmul: far slower on CPU

    def _causal(self, sel: _Selected, bins_q: Tensor, bins_k: Tensor, offset: int) -> Tensor:
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
        return self._readout(sel.lq, zq, uq)

    def _full(self, sel: _Selected, bins_q: Tensor, bins_k: Tensor, n_bins: int) -> Tensor:
        z, m = self._totals(sel, bins_k, n_bins)
        return self._readout(sel.lq, z[bins_q], m[bins_q])

    # ------------------------------------------------------------------ AttentionBackend
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        self._check(q, k, v, mask)
        return self._forward(q, k, v, bank, mask)[0], {"backend": self.name, "top_k": self.params.top_k}

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec) -> tuple[Tensor, Any]:
        batch, heads, n_q, _ = q.shape
        n_k, dv = k.shape[-2], v.shape[-1]
        sel = self._select(q, k, v, bank, mask.key_padding)
        n_bins = batch * heads * bank.capacity
        if n_q == 0 or n_k == 0:
            out = sel.vf.new_zeros(batch, heads, n_q, dv)
            return out.to(v.dtype), sel
        bins_q, bins_k = self._bins(sel, bank.capacity)
        if mask.causal:
            out = self._causal(sel, bins_q, bins_k, mask.offset(n_q, n_k))
        else:
            out = self._full(sel, bins_q, bins_k, n_bins)
        if mask.query_padding is not None:
            out = out * mask.query_padding[:, None, :, None].to(out)
        return out.to(v.dtype), sel

    # ------------------------------------------------------------------ RecurrentBackend
    @staticmethod
    def _state_dtype(bank: SplatBank) -> torch.dtype:
        return torch.float64 if bank.centers.dtype == torch.float64 else torch.float32

    def init_state(self, bank: SplatBank, batch: int, value_dim: int, device: torch.device) -> SparseState:
        dtype = self._state_dtype(bank)
        shape = (batch, bank.n_heads, bank.capacity)
        return SparseState(
            log_norm=torch.full(shape, NEG_INF, dtype=dtype, device=device),
            memory=torch.zeros((*shape, value_dim), dtype=dtype, device=device),
        )

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec) -> tuple[Tensor, SparseState]:
        """Causal forward over a prompt and the per-splat state after its last key."""
        if not mask.causal or mask.query_offset not in (None, k.shape[-2] - q.shape[-2]):
            mask = dataclasses.replace(mask, causal=True, query_offset=None)
        self._check(q, k, v, mask)
        out, sel = self._forward(q, k, v, bank, mask)
        batch, heads, n_k, _ = k.shape
        state = self.init_state(bank, batch, v.shape[-1], k.device)
        if n_k > 0:
            _, bins_k = self._bins(sel, bank.capacity)
            z, m = self._totals(sel, bins_k, batch * heads * bank.capacity)
            state = SparseState(z.view_as(state.log_norm).to(state.log_norm.dtype),
                                m.view_as(state.memory).to(state.memory.dtype), n_k)
        return out, state

    def step(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: SparseState,
             key_padding: Tensor | None = None) -> tuple[Tensor, SparseState]:
        """Decode ``t >= 1`` new tokens (``[B, H, t, ·]``) one by one; each query sees its own key."""
        if q.shape[-2] != k.shape[-2] or k.shape[-2] != v.shape[-2]:
            raise ValueError(f"step needs as many queries as keys and values, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        if key_padding is not None and tuple(key_padding.shape) != (k.shape[0], k.shape[-2]):
            raise ValueError(f"key_padding must be [{k.shape[0]}, {k.shape[-2]}], got {tuple(key_padding.shape)}")
        if state.memory.shape[-1] != v.shape[-1] or state.log_norm.shape[:2] != k.shape[:2]:
            raise ValueError(f"state for batch/heads/value dim {tuple(state.memory.shape)} does not fit "
                             f"values {tuple(v.shape)}")
        outs = []
        for t in range(q.shape[-2]):
            sl = slice(t, t + 1)
            pad = None if key_padding is None else key_padding[:, sl]
            sel = self._select(q[..., sl, :], k[..., sl, :], v[..., sl, :], bank, pad)
            z, mem = state.log_norm.to(sel.lk.dtype), state.memory.to(sel.lk.dtype)
            # fold the new key into its k splats (distinct slots, so the scatter has no duplicates)
            ik = sel.ik[..., 0, :]
            z_rows = z.gather(-1, ik)
            m_rows = mem.gather(-2, ik.unsqueeze(-1).expand(-1, -1, -1, mem.shape[-1]))
            new_z, new_m = _merge(z_rows, m_rows, sel.lk[..., 0, :],
                                  sel.vf[..., 0, :].unsqueeze(-2).expand_as(m_rows))
            z = z.scatter(-1, ik, new_z)
            mem = mem.scatter(-2, ik.unsqueeze(-1).expand_as(new_m), new_m)
            # read the query's k splats
            iq = sel.iq[..., 0, :]
            zq = z.gather(-1, iq)
            uq = mem.gather(-2, iq.unsqueeze(-1).expand(-1, -1, -1, mem.shape[-1]))
            outs.append(self._readout(sel.lq[..., 0, :], zq, uq).unsqueeze(-2).to(v.dtype))
            state = SparseState(z, mem, state.length + 1)
        return torch.cat(outs, dim=-2), state
