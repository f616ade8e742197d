"""Synthetic data for tests and demos: clustered query/key streams with a controllable shift, and an
associative-recall sequence task. Every draw is a pure function of ``(seed, step)``.

- :class:`ClusteredStream`: per head, queries and keys drawn from a mixture of Gaussian clusters. At
  ``shift_at`` a fraction of the clusters moves: each moved center becomes
  ``c + magnitude·(c_new − c)`` with ``c_new`` a fresh draw, so ``magnitude`` 0 is no shift and 1 a
  complete relocation. Stationary when ``shift_at`` is None.
- :class:`AssociativeRecall`: ``k1 v1 k2 v2 … kn vn q`` token sequences where the answer to the query
  key ``q`` is the value that followed it. At ``shift_at`` the keys switch to a disjoint part of the
  vocabulary (a vocabulary shift the model has never seen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + salt * 104_729) % (2**63 - 1))


@dataclass(frozen=True)
class ClusteredStream:
    """Clustered queries and keys ``[B, H, n, d]`` (see the module docstring).

    ``spread``: std of the cluster centers; ``cluster_std``: std of the tokens around their center;
    ``key_noise``: extra std of keys around the same centers (keys and queries share the clusters).
    """

    n_heads: int = 2
    head_dim: int = 8
    n_clusters: int = 8
    spread: float = 3.0
    cluster_std: float = 0.3
    key_noise: float = 0.0
    shift_at: int | None = None
    shift_fraction: float = 1.0
    shift_magnitude: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.shift_fraction <= 1.0:
            raise ValueError(f"shift_fraction must be in [0, 1], got {self.shift_fraction}")
        if self.n_clusters < 1 or self.n_heads < 1 or self.head_dim < 1:
            raise ValueError("n_clusters, n_heads and head_dim must be positive")

    def shifted(self, step: int) -> bool:
        return self.shift_at is not None and step >= self.shift_at

    def centers(self, step: int = 0) -> Tensor:
        """Cluster centers in force at ``step``, ``[H, C, d]``."""
        g = _generator(self.seed, 0, salt=1)
        base = torch.randn(self.n_heads, self.n_clusters, self.head_dim, generator=g) * self.spread
        if not self.shifted(step):
            return base
        fresh = torch.randn(base.shape, generator=_generator(self.seed, 0, salt=2)) * self.spread
        moved = torch.zeros(self.n_clusters, dtype=torch.bool)
        moved[: round(self.shift_fraction * self.n_clusters)] = True
        target = base + self.shift_magnitude * (fresh - base)
        return torch.where(moved.view(1, -1, 1), target, base)

    def sample(self, step: int, batch: int, length: int, *, n_keys: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(q [B, H, n, d], k [B, H, m, d], key_cluster [B, H, m])`` for ``step``."""
        m = length if n_keys is None else n_keys
        g = _generator(self.seed, step, salt=3)
        centers = self.centers(step)
        h, c, d = centers.shape
        q_id = torch.randint(0, c, (batch, h, length), generator=g)
        k_id = torch.randint(0, c, (batch, h, m), generator=g)
        heads = torch.arange(h).view(1, h, 1)
        q = centers[heads, q_id] + self.cluster_std * torch.randn(batch, h, length, d, generator=g)
        k_std = (self.cluster_std**2 + self.key_noise**2) ** 0.5
        k = centers[heads, k_id] + k_std * torch.randn(batch, h, m, d, generator=g)
        return q, k, k_id

    def stream(self, steps: int, batch: int, length: int, start: int = 0):
        """Yield ``(step, q, k)`` for ``steps`` consecutive steps."""
        for step in range(start, start + steps):
            q, k, _ = self.sample(step, batch, length)
            yield step, q, k


@dataclass(frozen=True)
class RecallBatch:
    """``tokens [B, L]``; ``targets [B, L]`` (-100 except at the query, the last position); ``answer [B]``."""

    tokens: Tensor
    targets: Tensor
    answer: Tensor


@dataclass(frozen=True)
class AssociativeRecall:
    """Associative recall: ``n_pairs`` key/value pairs then a query key; predict its value.

    Vocabulary: ``[0, 2·n_keys)`` are keys (the first half before the shift, the second half after it),
    ``[2·n_keys, 2·n_keys + n_values)`` are values. Keys within a sequence are distinct.
    """

    n_pairs: int = 8
    n_keys: int = 16
    n_values: int = 16
    shift_at: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs ({self.n_pairs}) must not exceed n_keys ({self.n_keys}): keys are distinct")

    @property
    def vocab_size(self) -> int:
        return 2 * self.n_keys + self.n_values

    @property
    def length(self) -> int:
        return 2 * self.n_pairs + 1

    def key_range(self, step: int) -> tuple[int, int]:
        shifted = self.shift_at is not None and step >= self.shift_at
        start = self.n_keys if shifted else 0
        return start, start + self.n_keys

    def sample(self, step: int, batch: int) -> RecallBatch:
        g = _generator(self.seed, step, salt=5)
        lo, _ = self.key_range(step)
        keys = torch.argsort(torch.rand(batch, self.n_keys, generator=g), dim=-1)[:, : self.n_pairs] + lo
        values = torch.randint(0, self.n_values, (batch, self.n_pairs), generator=g) + 2 * self.n_keys
        pick = torch.randint(0, self.n_pairs, (batch,), generator=g)
        rows = torch.arange(batch)
        tokens = torch.empty(batch, self.length, dtype=torch.long)
        tokens[:, 0:-1:2] = keys
        tokens[:, 1:-1:2] = values
        tokens[:, -1] = keys[rows, pick]
        answer = values[rows, pick]
        targets = torch.full_like(tokens, -100)
        targets[:, -1] = answer
        return RecallBatch(tokens=tokens, targets=targets, answer=answer)


__all__ = ["AssociativeRecall", "ClusteredStream", "RecallBatch"]
