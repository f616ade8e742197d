"""FLOP counts shared by the backends' ``flops`` methods (matmul-equivalent work; elementwise passes not counted).

Why here: every backend computes the same log-features and sees the same causal triangle, so they
count those once; a backend's own ``flops`` adds what is particular to its algorithm.
"""

from __future__ import annotations

from gsa_core.bank import SplatBank


def feature_flops(bank: SplatBank, n: int) -> float:
    """FLOPs of ``bank.log_features`` for ``n`` vectors of one head: the Mahalanobis form against ``K`` slots.

    Isotropic: one GEMM (``2·n·d·K``); diagonal: two (``x² @ inv_var``, ``x @ (mu·inv_var)``); full:
    whitening every vector per slot (``2·n·K·d²``).
    """
    d, k = bank.head_dim, bank.capacity
    if bank.covariance == "isotropic":
        return 2.0 * n * d * k
    if bank.covariance == "diagonal":
        return 4.0 * n * d * k
    return 2.0 * n * k * d * d


def visible_pairs(n_q: int, n_k: int, causal: bool) -> int:
    """Query-key pairs a mask lets through: all of them, or the causal ones with queries as the last keys."""
    if not causal:
        return n_q * n_k
    off = n_k - n_q
    # query i sees min(n_k, max(0, i + off + 1)) keys
    total = 0
    first_full = max(0, n_k - off - 1)  # from this query on, every key is visible
    start = max(0, -off)  # queries before this one see nothing
    end = min(n_q, first_full)
    if end > start:  # i + off + 1 for i in [start, end)
        total += (end - start) * (off + 1) + (end - 1 + start) * (end - start) // 2
    total += max(0, n_q - max(end, start)) * n_k
    return total


__all__ = ["feature_flops", "visible_pairs"]
