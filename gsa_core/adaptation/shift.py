"""Distribution-shift detection on each head's queries and keys.

Per step the detector pushes the sufficient statistics of the step's queries and keys for every head
(token count, sum, sum of outer products) into a ring buffer of ``2·window`` steps. The test compares
the newest ``window`` steps (*recent*) with the ``window`` steps before them (*reference*): a Gaussian
with full covariance is fitted to each (ridge-regularised) and the test statistic is their symmetric
KL divergence per dimension,

    D = ( tr(Σr⁻¹Σn) + tr(Σn⁻¹Σr) − 2d + Δμᵀ(Σr⁻¹ + Σn⁻¹)Δμ ) / (4d),

the largest over heads and over queries/keys. Two adjacent windows of the same distribution give
``D ≈ (d+1)/(2N)`` for ``N`` tokens per window, so the test ignores sampling noise and slow drift (the
model learning) and fires on an abrupt change of where the tokens lie. ``D >= threshold`` is a shift.

Windows are sums, so under ``torch.distributed`` the two window sums are all-reduced before the test and
every rank computes the same ``D`` (see :mod:`gsa_core.adaptation.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gsa_core.adaptation.ring_buffer import RingBuffer

Reducer = Callable[[Tensor], Tensor]


def gaussian_symmetric_kl(
    count_a: Tensor, sum_a: Tensor, outer_a: Tensor, count_b: Tensor, sum_b: Tensor, outer_b: Tensor,
    ridge: float = 1e-3,
) -> Tensor:
    """Symmetric KL per dimension between Gaussians fitted to two sets of sufficient statistics.

    ``count [...]``, ``sum [..., d]``, ``outer [..., d, d]`` -> ``[...]`` (0 where either set is empty).
    """
    d = sum_a.shape[-1]
    a = count_a.double().clamp_min(1).unsqueeze(-1)
    b = count_b.double().clamp_min(1).unsqueeze(-1)
    mu_a, mu_b = sum_a.double() / a, sum_b.double() / b
    cov_a = outer_a.double() / a.unsqueeze(-1) - mu_a.unsqueeze(-1) * mu_a.unsqueeze(-2)
    cov_b = outer_b.double() / b.unsqueeze(-1) - mu_b.unsqueeze(-1) * mu_b.unsqueeze(-2)
    scale = 0.5 * (cov_a.diagonal(dim1=-2, dim2=-1).mean(-1) + cov_b.diagonal(dim1=-2, dim2=-1).mean(-1))
    eye = torch.eye(d, dtype=torch.float64, device=sum_a.device)
    reg = (ridge * scale.clamp_min(1e-12)).unsqueeze(-1).unsqueeze(-1) * eye
    cov_a, cov_b = cov_a + reg, cov_b + reg
    inv_a, inv_b = torch.linalg.inv(cov_a), torch.linalg.inv(cov_b)
    diff = (mu_a - mu_b).unsqueeze(-1)
    trace = (inv_a * cov_b.transpose(-1, -2)).sum((-1, -2)) + (inv_b * cov_a.transpose(-1, -2)).sum((-1, -2))
    mean_term = (diff.transpose(-1, -2) @ (inv_a + inv_b) @ diff).squeeze(-1).squeeze(-1)
    value = (trace - 2 * d + mean_term) / (4 * d)
    empty = (count_a <= 1) | (count_b <= 1)
    return value.clamp_min(0).masked_fill(empty, 0.0).float()


class ShiftDetector:
    """Two-window test on per-head query/key statistics (see the module docstring).

    ``push(q, k)`` once per step with ``q [B, H, n, d]`` / ``k [B, H, m, d]`` (any leading dims; at
    most ``max_tokens`` tokens per head are used). ``score()`` is 0 until both windows are full.
    """

    def __init__(
        self, n_heads: int, head_dim: int, window: int = 20, *, threshold: float = 0.25,
        ridge: float = 1e-3, max_tokens: int = 4096,
    ) -> None:
        if window < 1:
            raise ValueError(f"ShiftDetector window must be >= 1, got {window}")
        self.n_heads, self.head_dim, self.window = n_heads, head_dim, window
        self.threshold, self.ridge, self.max_tokens = threshold, ridge, max_tokens
        h, d = n_heads, head_dim
        self.counts = RingBuffer(2 * window, (2, h), dtype=torch.float64)
        self.sums = RingBuffer(2 * window, (2, h, d), dtype=torch.float64)
        self.outers = RingBuffer(2 * window, (2, h, d, d), dtype=torch.float64)
        self._acc: list[Tensor] | None = None
        self.last_score = 0.0

    def to(self, device: torch.device | str) -> ShiftDetector:
        for buf in (self.counts, self.sums, self.outers):
            buf.to(device)
        return self

    @torch.no_grad()
    def _suff(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x.detach().double()
        x = x.reshape(-1, self.n_heads, x.shape[-2], self.head_dim).transpose(0, 1).reshape(
            self.n_heads, -1, self.head_dim)
        if x.shape[1] > self.max_tokens:
            idx = torch.linspace(0, x.shape[1] - 1, self.max_tokens, device=x.device).round().long()
            x = x.index_select(1, idx)
        return (torch.full((self.n_heads,), float(x.shape[1]), dtype=torch.float64, device=x.device),
                x.sum(1), x.transpose(1, 2) @ x)

    @torch.no_grad()
    def observe(self, q: Tensor, k: Tensor) -> None:
        """Add one forward's queries and keys to the current step (several calls per step are summed)."""
        cq, sq, oq = self._suff(q)
        ck, sk, ok = self._suff(k)
        parts = [torch.stack([cq, ck]), torch.stack([sq, sk]), torch.stack([oq, ok])]
        if self._acc is None:
            self._acc = parts
        else:
            self._acc = [a + p for a, p in zip(self._acc, parts, strict=True)]

    def end_step(self) -> bool:
        """Close the current step: push what :meth:`observe` collected (nothing observed: no push)."""
        if self._acc is None:
            return False
        for buf, value in zip((self.counts, self.sums, self.outers), self._acc, strict=True):
            buf.push(value)
        self._acc = None
        return True

    def push(self, q: Tensor, k: Tensor) -> None:
        """``observe`` + ``end_step`` for one forward per step."""
        self.observe(q, k)
        self.end_step()

    @property
    def ready(self) -> bool:
        return len(self.counts) >= 2 * self.window

    def window_sums(self) -> Tensor:
        """Recent and total sums flattened into one vector (what is all-reduced across ranks)."""
        w = self.window
        parts = [buf.sum(last=w).flatten() for buf in (self.counts, self.sums, self.outers)]
        parts += [buf.sum().flatten() for buf in (self.counts, self.sums, self.outers)]
        return torch.cat(parts)

    def _unflatten(self, flat: Tensor) -> list[Tensor]:
        shapes = [b.shape for b in (self.counts, self.sums, self.outers)] * 2
        out, at = [], 0
        for shape in shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(flat[at:at + n].reshape(shape))
            at += n
        return out

    @torch.no_grad()
    def scores(self, reduce: Reducer | None = None) -> Tensor:
        """The statistic per (queries/keys, head), ``[2, H]``; zeros until both windows are full.

        ``reduce`` (e.g. an all-reduce sum across ranks) is applied to the window sums first.
        """
        if not self.ready:
            return torch.zeros(2, self.n_heads)
        flat = self.window_sums()
        if reduce is not None:
            flat = reduce(flat)
        rc, rs, ro, tc, ts, to = self._unflatten(flat)
        return gaussian_symmetric_kl(rc, rs, ro, tc - rc, ts - rs, to - ro, self.ridge).cpu()

    def score(self, reduce: Reducer | None = None) -> float:
        """The largest statistic over heads and over queries/keys (0 until both windows are full)."""
        self.last_score = float(self.scores(reduce).max())
        return self.last_score

    def shifted(self, reduce: Reducer | None = None) -> bool:
        return self.score(reduce) >= self.threshold

    def reset(self) -> None:
        """Start both windows afresh (after a detected shift: the new distribution becomes the reference)."""
        for buf in (self.counts, self.sums, self.outers):
            buf.clear()
        self._acc = None

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.state_dict(), "sums": self.sums.state_dict(),
                "outers": self.outers.state_dict(), "last_score": self.last_score}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts.load_state_dict(state["counts"])
        self.sums.load_state_dict(state["sums"])
        self.outers.load_state_dict(state["outers"])
        self.last_score = float(state.get("last_score", 0.0))


__all__ = ["ShiftDetector", "gaussian_symmetric_kl"]
