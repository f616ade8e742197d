"""Per-slot statistics, accumulated after each backward pass and kept in ring buffers over a window.

Three statistics per slot (DESIGN.md section 3), each a ``[H, K]`` tensor per step:

- **mass**: the attention mass a splat carries. Every backend computes the same output
  ``o_t = Σ_s π_ts M_s`` with ``π_ts = softmax_s(l_s(q_t) + z_{s,t})`` and
  ``z_{s,t} = logsumexp_{j visible to t} l_s(k_j)`` (the kernel form of section 2), so the share of
  query ``t``'s output routed through splat ``s`` is exactly ``π_ts``, whatever backend ran. It is
  computed from the detached queries and keys, under ``no_grad``, on a subsample of the batch, with a
  ``logcumsumexp`` for causal masks. The step's value is the mean of ``π_ts`` over the sampled real
  queries, so each head's masses sum to 1 over its slots.
- **grad_norm**: ``‖∂L/∂mu_s‖``, read from ``bank.centers.grad`` after backward.
- **hits**: how many sampled query tokens had the slot as their largest ``π_ts``.

The same pass measures **coverage**: a token ``x`` is covered when its nearest alive splat is within
``radius`` standard deviations (RMS per axis: ``sqrt(min_s maha_s(x) / d) <= radius``); the worst
covered tokens of each step are kept as candidates for coverage-gap seeding.

A slot's history is cleared when the slot is written (birth), and window means divide by the number of
steps the *current* occupant has been observed (``age``), so a newborn is not judged by its
predecessor's record nor by steps before it existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gsa_core.adaptation.ring_buffer import RingBuffer
from gsa_core.bank import SplatBank
from gsa_core.masks import MaskSpec
from gsa_core.numerics import safe_logsumexp, safe_softmax
from gsa_core.protocols import SlotStats

#: A token is covered when its nearest alive splat is within this many standard deviations (RMS per axis).
DEFAULT_COVERAGE_RADIUS = 2.0


@dataclass
class WindowStats(SlotStats):
    """:class:`SlotStats` plus what the adaptation machinery knows beyond the protocol's fields.

    ``age [H, K]``: steps of the current occupant's history in the window (0 for a slot just written);
    ``coverage [H]``: mean fraction of sampled tokens covered over the window;
    ``typical_distance [H]``: mean over the window of the median token's distance to its nearest splat;
    ``gap_points [H, P, d]`` / ``gap_dist [H, P]``: the worst covered tokens seen recently and their
    distance to the nearest alive splat in standard deviations (``-inf`` marks an empty row).
    Policies must work without them (a plain ``SlotStats`` has none), so every extra is optional.
    """

    age: Tensor | None = None
    coverage: Tensor | None = None
    typical_distance: Tensor | None = None
    gap_points: Tensor | None = None
    gap_dist: Tensor | None = None


# ----------------------------------------------------------------------------- pure functions
@torch.no_grad()
def features_and_distance(bank: SplatBank, x: Tensor) -> tuple[Tensor, Tensor]:
    """Log-features ``[..., H, n, K]`` (dead slots ``-inf``) and the RMS distance in standard deviations
    from each token to its nearest alive splat, ``[..., H, n]`` (``inf`` when none is alive)."""
    maha = bank.mahalanobis(x)
    logf = bank.slot_bias().to(maha.dtype).unsqueeze(-2) - 0.5 * maha
    if bool(bank.alive.all()):
        nearest = maha.amin(-1)
    else:
        dead = ~bank.alive.unsqueeze(-2)
        logf = logf.masked_fill(dead, float("-inf"))
        nearest = maha.masked_fill(dead, float("inf")).amin(-1)
    return logf, (nearest / bank.head_dim).sqrt()


def _visible_log_normaliser(lk: Tensor, mask: MaskSpec, n_q: int, query_index: Tensor) -> Tensor:
    """``z_{s,t}``: logsumexp of ``lk [B, H, n_k, K]`` over the keys visible to each selected query,
    ``[B, H, len(query_index), K]`` (or ``[B, H, 1, K]`` when every query sees every key)."""
    n_k = lk.shape[-2]
    if not mask.causal and mask.attend is None:
        return safe_logsumexp(lk, dim=-2, keepdim=True)
    if mask.causal and mask.window is None and mask.attend is None:
        cum = torch.logcumsumexp(lk, dim=-2)
        pos = query_index + mask.offset(n_q, n_k)  # last visible key of each query
        z = cum.index_select(-2, pos.clamp(0, n_k - 1))
        return z.masked_fill((pos < 0).view(1, 1, -1, 1), float("-inf"))
    # sliding window or arbitrary mask: exact logsumexp over the visible keys of the sampled queries
    allowed = mask.allowed(n_q, n_k, device=lk.device)
    if allowed.shape[-2] > 1:
        allowed = allowed.index_select(-2, query_index)
    bias = torch.zeros(allowed.shape, dtype=lk.dtype, device=lk.device).masked_fill(~allowed, float("-inf"))
    return safe_logsumexp(lk.unsqueeze(-3) + bias.unsqueeze(-1), dim=-2)


def _routing(lq: Tensor, lk: Tensor, mask: MaskSpec, n_q: int, query_index: Tensor) -> Tensor:
    """``π`` from the selected queries' features ``lq [B, H, m, K]`` and every key's ``lk [B, H, n_k, K]``."""
    if mask.key_padding is not None:
        lk = lk.masked_fill(~mask.key_padding.to(lk.device)[:, None, :, None], float("-inf"))
    z = _visible_log_normaliser(lk, mask, n_q, query_index)
    pi = safe_softmax(lq + z, dim=-1)  # rows with nothing visible are all zero
    if mask.query_padding is not None:
        real = mask.query_padding.to(pi.device).index_select(-1, query_index)
        pi = pi * real[:, None, :, None].to(pi.dtype)
    return pi


def _query_index(n_q: int, max_queries: int | None, device: torch.device) -> Tensor:
    if max_queries is not None and n_q > max_queries:
        return torch.linspace(0, n_q - 1, max_queries, device=device).round().long().unique()
    return torch.arange(n_q, device=device)


@torch.no_grad()
def slot_routing(
    bank: SplatBank, q: Tensor, k: Tensor, mask: MaskSpec | None = None, query_index: Tensor | None = None
) -> Tensor:
    """``π_ts``: the share of query ``t``'s output routed through splat ``s``, ``[B, H, n, K]``.

    ``o_t = Σ_s π_ts M_{s,t}`` holds exactly for every backend. Queries that see no key and padded
    queries get all-zero rows. ``query_index`` selects query positions (all keys are always used).
    """
    n_q = q.shape[-2]
    if query_index is None:
        query_index = torch.arange(n_q, device=q.device)
    lq = bank.log_features(q.index_select(-2, query_index))
    return _routing(lq, bank.log_features(k), mask or MaskSpec(), n_q, query_index)


def _mass_from_routing(pi: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    valid = pi.sum(-1) > 0.5  # [B, H, n]
    mass_sum = pi.sum((0, 2))
    best = (pi == pi.amax(-1, keepdim=True)) & valid.unsqueeze(-1)  # (exact ties count for each)
    hits = best.sum((0, 2), dtype=pi.dtype)
    return mass_sum.float(), hits.float(), valid.sum((0, 2)).float()


@torch.no_grad()
def slot_mass(
    bank: SplatBank, q: Tensor, k: Tensor, mask: MaskSpec | None = None, *, max_queries: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention mass routed through each slot: ``(mass_sum [H, K], hits [H, K], n_queries [H])``.

    ``q [B, H, n_q, d]``, ``k [B, H, n_k, d]``; ``mass_sum`` sums ``π_ts`` (:func:`slot_routing`) over
    the real queries used (a query that sees no key, or a padded one, counts for nothing), ``hits``
    counts the queries whose largest ``π_ts`` is slot ``s``, ``n_queries`` is how many queries counted.
    ``max_queries`` evenly subsamples the query positions (all keys are always used, so ``z`` stays exact).
    """
    pi = slot_routing(bank, q, k, mask, _query_index(q.shape[-2], max_queries, q.device))
    return _mass_from_routing(pi, bank.capacity)


@torch.no_grad()
def worst_covered(points: Tensor, distance: Tensor, n: int, *, spread: bool = False) -> tuple[Tensor, Tensor]:
    """Poorly covered tokens of each head: ``points [H, N, d]``, ``distance [H, N]`` -> ``([H, n, d], [H, n])``.

    Default: the ``n`` tokens farthest from any alive splat, worst first. ``spread``: half of them are
    the worst, the other half evenly spaced through the worse half of an even subsample of ``8n``
    tokens (the worst tokens of a step often sit in one region; the spaced ones show the others).
    Rows beyond ``N`` are zeros with distance ``-inf``.
    """
    h, count, d = points.shape
    take = min(n, count)
    if spread and take >= 2 and count > take:
        top = take // 2
        _, worst_idx = distance.topk(top, dim=-1)
        sub = torch.linspace(0, count - 1, min(count, 8 * n), device=distance.device).round().long()
        order = sub[distance.index_select(1, sub).argsort(dim=-1, descending=True, stable=True)]
        half = order[:, : max(take - top, order.shape[1] // 2)]
        pick = torch.linspace(0, half.shape[1] - 1, take - top, device=distance.device).round().long()
        idx = torch.cat([worst_idx, half.index_select(1, pick)], 1)
        dist = distance.gather(1, idx)
    else:
        dist, idx = distance.topk(take, dim=-1) if take else (distance[:, :0], distance[:, :0].long())
    pts = points.gather(1, idx.unsqueeze(-1).expand(h, take, d))
    if take < n:
        pts = torch.cat([pts, pts.new_zeros(h, n - take, d)], 1)
        dist = torch.cat([dist, dist.new_full((h, n - take), float("-inf"))], 1)
    return pts, dist


# ----------------------------------------------------------------------------- accumulation
@dataclass
class _Observation:
    q: Tensor
    k: Tensor
    mask: MaskSpec | None


class SlotStatistics:
    """Windowed statistics of one bank.

    Call :meth:`observe` with each forward's queries and keys (the controller's hook does), then
    :meth:`accumulate` once per training step after ``backward`` (reads ``bank.centers.grad``).
    ``max_tokens`` bounds the query tokens used for mass per step (the batch is subsampled: first
    whole sequences, then evenly spaced positions), which keeps the overhead small.
    """

    def __init__(
        self,
        bank: SplatBank,
        window: int,
        *,
        max_tokens: int = 512,
        gap_points: int = 16,
        gap_window: int = 8,
        coverage_radius: float = DEFAULT_COVERAGE_RADIUS,
        max_calls: int = 4,
    ) -> None:
        self.bank = bank
        self.window = window
        self.max_tokens = max_tokens
        self.coverage_radius = coverage_radius
        self.max_calls = max_calls
        h, k, d = bank.n_heads, bank.capacity, bank.head_dim
        device = bank.alive.device
        self.mass = RingBuffer(window, (h, k), device=device)
        self.grad_norm = RingBuffer(window, (h, k), device=device)
        self.hits = RingBuffer(window, (h, k), device=device)
        self.coverage = RingBuffer(window, (h,), device=device)
        self.typical = RingBuffer(window, (h,), device=device)
        self.gap_points = RingBuffer(gap_window, (h, gap_points, d), device=device)
        self.gap_dist = RingBuffer(gap_window, (h, gap_points), device=device)
        self.gap_dist.data.fill_(float("-inf"))
        self.age = torch.zeros(h, k, dtype=torch.long, device=device)
        self.n_gap = gap_points
        self.pending: list[_Observation] = []
        self.steps = 0

    # ----------------------------------------------------------------- per forward
    @torch.no_grad()
    def observe(self, q: Tensor, k: Tensor, mask: MaskSpec | None = None) -> None:
        """Keep (references to) a forward's detached queries and keys, subsampled to ``max_tokens``."""
        if len(self.pending) >= self.max_calls:
            return
        q, k = q.detach(), k.detach()
        batch, n_q = q.shape[0], q.shape[-2]
        rows = max(1, min(batch, self.max_tokens // max(n_q, 1)))
        if rows < batch:
            q, k = q[:rows], k[:rows]
            if mask is not None:
                mask = MaskSpec(
                    causal=mask.causal, window=mask.window, query_offset=mask.query_offset,
                    key_padding=None if mask.key_padding is None else mask.key_padding[:rows],
                    query_padding=None if mask.query_padding is None else mask.query_padding[:rows],
                    attend=None if mask.attend is None or mask.attend.shape[0] == 1 else mask.attend[:rows],
                )
        self.pending.append(_Observation(q, k, mask))

    # ----------------------------------------------------------------- per step
    @torch.no_grad()
    def accumulate(self) -> bool:
        """Turn this step's observations and gradients into one entry per ring buffer.

        Returns False (and records nothing) when the bank was neither used nor given a gradient.
        """
        bank = self.bank
        h, k_cap = bank.n_heads, bank.capacity
        grad = bank.centers.grad
        if not self.pending and grad is None:
            return False
        mass = torch.zeros(h, k_cap, device=bank.alive.device)
        hits = torch.zeros_like(mass)
        count = torch.zeros(h, device=mass.device)
        pts_list, dist_list = [], []
        padded = False
        for obs in self.pending:
            mask = obs.mask or MaskSpec()
            n_q = obs.q.shape[-2]
            index = _query_index(n_q, self.max_tokens, obs.q.device)
            q_sel = obs.q if index.numel() == n_q else obs.q.index_select(-2, index)
            m_q = q_sel.shape[-2]
            if q_sel.shape[:-2] == obs.k.shape[:-2]:  # one Mahalanobis pass serves features and distances
                both = torch.cat([q_sel, obs.k], -2)
                logf, dist_all = features_and_distance(bank, both)
                lq, lk = logf[..., :m_q, :], logf[..., m_q:, :]
                dist_q, dist_k = dist_all[..., :m_q], dist_all[..., m_q:]
            else:
                lq, dist_q = features_and_distance(bank, q_sel)
                lk, dist_k = features_and_distance(bank, obs.k)
            m, hi, n = _mass_from_routing(_routing(lq, lk, mask, n_q, index), k_cap)
            mass += m
            hits += hi
            count += n
            q_pad = None if mask.query_padding is None else mask.query_padding.index_select(-1, index)
            if q_pad is None and mask.key_padding is None and q_sel.shape[:-2] == obs.k.shape[:-2]:
                pts_list.append(both.float().transpose(0, 1).reshape(h, -1, bank.head_dim))
                dist_list.append(dist_all.transpose(0, 1).reshape(h, -1))
                continue
            for x, dist, pad in ((q_sel, dist_q, q_pad), (obs.k, dist_k, mask.key_padding)):
                if pad is not None:
                    dist = dist.masked_fill(~pad.to(dist.device)[:, None, :], float("nan"))
                    padded = True
                pts_list.append(x.float().transpose(0, 1).reshape(h, -1, bank.head_dim))
                dist_list.append(dist.transpose(0, 1).reshape(h, -1))
        self.pending.clear()
        if pts_list:
            points, dist = torch.cat(pts_list, 1), torch.cat(dist_list, 1)
            if padded:
                real = ~dist.isnan()
                covered = ((dist <= self.coverage_radius) & real).sum(-1) / real.sum(-1).clamp_min(1)
                typical = dist.nanmedian(-1).values.nan_to_num(nan=0.0)
                dist = dist.nan_to_num(nan=float("-inf"), posinf=1e30, neginf=float("-inf"))
            else:
                covered = (dist <= self.coverage_radius).float().mean(-1)
                typical = dist.median(-1).values
                dist = dist.clamp(max=1e30)
            self.typical.push(typical.clamp(max=1e30))
            self.coverage.push(covered)
            pts, worst = worst_covered(points, dist, self.n_gap, spread=True)
            self.gap_points.push(pts)
            self.gap_dist.push(worst)
            self.mass.push(mass / count.clamp_min(1).unsqueeze(-1))
            self.hits.push(hits)
        else:
            self.mass.push(0.0)
            self.hits.push(0.0)
        if grad is not None:
            self.grad_norm.push(grad.detach().float().norm(dim=-1).masked_fill(~bank.alive, 0.0))
        else:
            self.grad_norm.push(0.0)
        self.age = torch.clamp(self.age + 1, max=self.window)
        self.steps += 1
        return True

    # ----------------------------------------------------------------- slot writes
    @torch.no_grad()
    def forget(self, written: Tensor) -> None:
        """Clear the history of the slots in ``written [H, K]`` (they hold new splats now)."""
        written = written.to(self.age.device)
        for buf in (self.mass, self.grad_norm, self.hits):
            buf.fill_where(written)
        self.age = self.age.masked_fill(written, 0)

    def reset(self) -> None:
        """Forget everything (e.g. after a distribution shift made the history stale)."""
        for buf in (self.mass, self.grad_norm, self.hits, self.coverage, self.typical, self.gap_points):
            buf.clear()
        self.gap_dist.clear()
        self.gap_dist.data.fill_(float("-inf"))
        self.age.zero_()
        self.pending.clear()

    # ----------------------------------------------------------------- reading
    def window_sums(self) -> dict[str, Tensor]:
        """Sums over the window (the quantities that are all-reduced across ranks)."""
        return {
            "mass": self.mass.sum(), "grad_norm": self.grad_norm.sum(), "hits": self.hits.sum(),
            "coverage": self.coverage.sum(), "typical_distance": self.typical.sum(),
        }

    def gap_candidates(self, fixed: bool = False) -> tuple[Tensor, Tensor]:
        """Every stored gap candidate: ``points [H, P', d]`` and ``dist [H, P']`` (``-inf`` = empty).

        ``fixed``: the whole storage (same shape on every rank, empty rows ``-inf``), for all-gathers.
        """
        h, d = self.bank.n_heads, self.bank.head_dim
        if fixed:
            pts = self.gap_points.data.transpose(0, 1).reshape(h, -1, d)
            dist = self.gap_dist.data.clone()
            dist[~self.gap_dist.held_mask()] = float("-inf")
            return pts, dist.transpose(0, 1).reshape(h, -1)
        if len(self.gap_points) == 0:
            return torch.zeros(h, 0, d), torch.zeros(h, 0)
        pts = self.gap_points.values().transpose(0, 1).reshape(h, -1, d)
        dist = self.gap_dist.values().transpose(0, 1).reshape(h, -1)
        return pts, dist

    def stats(self, sums: dict[str, Tensor] | None = None, gaps: tuple[Tensor, Tensor] | None = None) -> WindowStats:
        """The window's :class:`WindowStats`; ``sums`` / ``gaps`` override the local ones (all-reduced)."""
        sums = sums if sums is not None else self.window_sums()
        points, dist = gaps if gaps is not None else self.gap_candidates()
        if points.shape[1]:
            # distances against the bank as it is now: a gap seeded at the last refine is no gap any more
            _, now = features_and_distance(self.bank, points.to(self.bank.centers.device))
            dist = torch.where(dist > float("-inf"), now.nan_to_num(posinf=1e30), dist)
        denom = self.age.clamp_min(1).float()
        held = len(self.coverage)
        return WindowStats(
            mass=sums["mass"] / denom, grad_norm=sums["grad_norm"] / denom, hits=sums["hits"] / denom,
            steps=len(self.mass), age=self.age.clone(),
            coverage=sums["coverage"] / max(held, 1) if held else None,
            typical_distance=sums["typical_distance"] / max(held, 1) if held else None,
            gap_points=points, gap_dist=dist,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffers": {name: getattr(self, name).state_dict()
                        for name in ("mass", "grad_norm", "hits", "coverage", "typical", "gap_points", "gap_dist")},
            "age": self.age.clone(), "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, buf_state in state["buffers"].items():
            getattr(self, name).load_state_dict(buf_state)
        self.age = state["age"].to(self.age.device).clone()
        self.steps = int(state["steps"])


__all__ = [
    "DEFAULT_COVERAGE_RADIUS", "SlotStatistics", "WindowStats", "features_and_distance", "slot_mass",
    "slot_routing", "worst_covered",
]
