"""Named regularisers on splat banks, chosen in a distillation's settings as ``{name: weight}``.

Why a registry of plain functions: the settings validate names against it (an unknown name is an
error listing the valid ones), and adding one is a one-line entry. Each function maps a
:class:`~gsa_core.bank.SplatBank` to a differentiable scalar over its alive slots.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gsa_core.bank import SplatBank

Regulariser = Callable[[SplatBank], Tensor]


def _variances(bank: SplatBank) -> Tensor:
    """Per-axis variances ``[H, K, d]`` (the diagonal of a full covariance)."""
    if bank.covariance == "full":
        return bank.covariance_matrix().diagonal(dim1=-2, dim2=-1)
    return bank.diag_scales().square()


def overlap(bank: SplatBank) -> Tensor:
    """Mean pairwise Bhattacharyya coefficient between alive splats of a head (diagonal covariances).

    ``BC = exp(-D_B)``, ``D_B = ⅛ Δμᵀ Σ⁻¹ Δμ + ½ log(det Σ / sqrt(det Σ_a det Σ_b))`` with ``Σ = (Σ_a + Σ_b)/2``;
    1 for identical splats, near 0 for disjoint ones. Penalising it keeps splats from collapsing onto
    one another (redundant slots waste capacity).
    """
    mu = bank.centers.float()
    var = _variances(bank).float()
    k = mu.shape[1]
    if k < 2:
        return mu.sum() * 0.0
    avg = 0.5 * (var.unsqueeze(2) + var.unsqueeze(1))  # [H, K, K, d]
    diff = mu.unsqueeze(2) - mu.unsqueeze(1)
    maha = (diff.square() / avg).sum(-1)
    log_var = var.log()
    log_det = avg.log().sum(-1) - 0.25 * (log_var.sum(-1).unsqueeze(2) + log_var.sum(-1).unsqueeze(1))
    coeff = torch.exp(-(0.125 * maha + 0.5 * log_det))
    alive = bank.alive
    pairs = alive.unsqueeze(2) & alive.unsqueeze(1) & ~torch.eye(k, dtype=torch.bool, device=mu.device)
    return (coeff * pairs).sum() / pairs.sum().clamp_min(1)


def amplitude_l1(bank: SplatBank) -> Tensor:
    """Mean amplitude ``a_s = exp(log_amplitude)`` of the alive slots: an L1 push towards few strong splats
    (slots driven to ~0 amplitude are what the ``amplitude-floor`` death policy frees)."""
    amp = bank.log_amplitude.float().exp()
    alive = bank.alive
    return (amp * alive).sum() / alive.sum().clamp_min(1)


REGULARISERS: dict[str, Regulariser] = {"overlap": overlap, "amplitude-l1": amplitude_l1}


def check_regularisers(weights: Mapping[str, float]) -> dict[str, float]:
    """Validate ``{name: weight}``: known names, finite non-negative weights. Errors list the valid names."""
    out = {}
    for name, weight in weights.items():
        if name not in REGULARISERS:
            close = difflib.get_close_matches(name, list(REGULARISERS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown regulariser {name!r}.{hint} Available regularisers: "
                             f"{', '.join(sorted(REGULARISERS))}")
        w = float(weight)
        if not (w >= 0.0 and w != float("inf")):
            raise ValueError(f"regulariser {name!r}: weight must be a finite number >= 0, got {weight!r}")
        out[name] = w
    return out


def regularisation(
    banks: Mapping[str, SplatBank], weights: Mapping[str, float]
) -> tuple[Tensor | None, dict[str, float]]:
    """``sum_name weight * mean_over_banks(fn(bank))`` and each term's (unweighted) value."""
    total: Tensor | None = None
    values: dict[str, float] = {}
    for name, weight in weights.items():
        if weight == 0.0 or not banks:
            continue
        term = torch.stack([REGULARISERS[name](bank) for bank in banks.values()]).mean()
        values[name] = float(term.detach())
        total = weight * term if total is None else total + weight * term
    return total, values


__all__ = ["REGULARISERS", "Regulariser", "amplitude_l1", "check_regularisers", "overlap", "regularisation"]
