"""Initializers: fill a bank's alive slots from calibration queries and keys."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.errors import CalibrationError
from gsa_core.registry import StrategyParams

MIN_SCALE = 1e-3


def pooled_vectors(bank: SplatBank, queries: Tensor | None, keys: Tensor | None) -> Tensor | None:
    """Queries and keys of each head stacked to ``[H, N, d]`` fp32, or None without data."""
    parts = [t for t in (queries, keys) if t is not None]
    if not parts:
        return None
    for t in parts:
        if t.dim() != 3 or t.shape[0] != bank.n_heads or t.shape[-1] != bank.head_dim:
            raise CalibrationError(
                f"calibration vectors must be [{bank.n_heads} heads, N, {bank.head_dim}], got {tuple(t.shape)}"
            )
    data = torch.cat([t.float() for t in parts], dim=1)
    bad = ~torch.isfinite(data).all(-1).all(-1)
    if bad.any():
        heads = bad.nonzero().flatten().tolist()
        raise CalibrationError(f"calibration vectors contain NaN or Inf in head(s) {heads}")
    return data if data.shape[1] > 0 else None


def write_alive(bank: SplatBank, centers: Tensor, log_amplitude: Tensor, axis_std: Tensor) -> None:
    """Write every alive slot: centers ``[H,K,d]``, log-amplitudes ``[H,K]``, per-axis stds ``[H,K,d]``."""
    heads, slots = bank.alive.nonzero(as_tuple=True)
    std = axis_std.clamp_min(MIN_SCALE)
    if bank.covariance == "isotropic":
        shape = {"log_scale": std.log().mean(-1)[heads, slots]}
    elif bank.covariance == "diagonal":
        shape = {"log_scale": std.log()[heads, slots]}
    else:
        raw = torch.diag_embed(std.log())
        shape = {"scale_tril_raw": raw[heads, slots]}
    bank.write_slots(heads, slots, centers=centers[heads, slots], log_amplitude=log_amplitude[heads, slots], **shape)


class RandomInit(StrategyParams):
    """Centers drawn from a Gaussian fitted to the data (unit Gaussian without data)."""

    scale_factor: float = Field(1.0, gt=0, description="splat std as a multiple of the data's spread")

    def initialize(
        self, bank: SplatBank, queries: Tensor | None, keys: Tensor | None, *, generator: torch.Generator
    ) -> None:
        h, k, d = bank.n_heads, bank.capacity, bank.head_dim
        data = pooled_vectors(bank, queries, keys)
        if data is None:
            mean, root_cov, spread = torch.zeros(h, d), torch.eye(d).expand(h, d, d), torch.ones(h, d)
        else:
            mean = data.mean(1)
            centred = data - mean.unsqueeze(1)
            cov = centred.transpose(1, 2) @ centred / max(1, data.shape[1] - 1)
            evals, evecs = torch.linalg.eigh(cov.double())
            root_cov = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)).float()
            spread = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        z = torch.randn(h, k, d, generator=generator)
        centers = mean.unsqueeze(1) + z @ root_cov.transpose(-1, -2)
        # Splats far narrower than the data would leave most tokens uncovered: scale with the
        # data's spread shrunk by the number of splats sharing it (one splat per K-th of the volume).
        shrink = self.scale_factor * k ** (-1.0 / max(d, 1)) if data is not None else self.scale_factor
        axis_std = (spread * shrink).unsqueeze(1).expand(h, k, d)
        axis_std = torch.where(torch.isfinite(axis_std), axis_std, torch.ones_like(axis_std))
        log_amp = torch.full((h, k), -math.log(k))
        write_alive(bank, centers, log_amp, axis_std)
