"""The splat bank: fixed-capacity Gaussian splats per head, with an ``alive`` mask.

Shapes never change after construction (DESIGN.md section 3): death clears a bit, birth writes a
dead slot in place, so optimizers, DDP, ``torch.compile`` and checkpoints keep working.
Every parameter value is a valid Gaussian: scales are stored as logs and full covariances as a
lower-triangular factor whose diagonal is stored as a log.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

CovarianceKind = Literal["isotropic", "diagonal", "full"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for every input dtype except fp64 (kept so ``gradcheck`` can run in double)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
COVARIANCE_KINDS: tuple[str, ...] = ("isotropic", "diagonal", "full")


def _fp(t: Tensor) -> Tensor:
    """A parameter in at least fp32 (fp64 parameters stay fp64)."""
    return t if t.dtype == torch.float64 else t.float()


class SplatBank(nn.Module):
    """Centers ``[H, K, d]``, log-amplitudes ``[H, K]``, covariance parameters and ``alive [H, K]``.

    ``log_scale`` is ``[H, K]`` (isotropic), ``[H, K, d]`` (diagonal) or, for ``full``,
    ``scale_tril_raw [H, K, d, d]`` whose strict lower triangle is the Cholesky factor's and whose
    diagonal holds the factor's log-diagonal.
    """

    def __init__(
        self,
        n_heads: int,
        head_dim: int,
        capacity: int,
        covariance: CovarianceKind = "diagonal",
        *,
        log_normalizer: bool = False,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        for label, value in (("n_heads", n_heads), ("head_dim", head_dim), ("capacity", capacity)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SplatBank {label} must be a positive integer, got {value!r}")
        if covariance not in COVARIANCE_KINDS:
            raise ValueError(
                f"unknown covariance kind {covariance!r}; valid kinds: {', '.join(COVARIANCE_KINDS)}"
            )
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        self.n_heads, self.head_dim, self.capacity = n_heads, head_dim, capacity
        self.covariance: CovarianceKind = covariance
        self.log_normalizer = log_normalizer
        h, k, d = n_heads, capacity, head_dim
        self.centers = nn.Parameter(torch.zeros(h, k, d))
        self.log_amplitude = nn.Parameter(torch.zeros(h, k))
        log_s = math.log(init_scale)
        if covariance == "isotropic":
            self.log_scale = nn.Parameter(torch.full((h, k), log_s))
        elif covariance == "diagonal":
            self.log_scale = nn.Parameter(torch.full((h, k, d), log_s))
        else:
            raw = torch.zeros(h, k, d, d)
            raw.diagonal(dim1=-2, dim2=-1).fill_(log_s)
            self.scale_tril_raw = nn.Parameter(raw)
        self.register_buffer("alive", torch.ones(h, k, dtype=torch.bool))

    # ----------------------------------------------------------------- covariance views
    def scale_tril(self) -> Tensor:
        """Cholesky factor ``L`` of every covariance, ``[H, K, d, d]`` (all kinds)."""
        if self.covariance == "full":
            raw = _fp(self.scale_tril_raw)
            return torch.tril(raw, -1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
        return torch.diag_embed(self.diag_scales())

    def diag_scales(self) -> Tensor:
        """Per-axis standard deviations ``[H, K, d]`` (isotropic and diagonal kinds)."""
        if self.covariance == "full":
            raise TypeError("diag_scales() is undefined for full covariances; use scale_tril()")
        s = _fp(self.log_scale).exp()
        return s.unsqueeze(-1).expand(-1, -1, self.head_dim) if self.covariance == "isotropic" else s

    def log_det_covariance(self) -> Tensor:
        """``log det Sigma`` per slot, ``[H, K]``."""
        if self.covariance == "isotropic":
            return 2.0 * self.head_dim * _fp(self.log_scale)
        if self.covariance == "diagonal":
            return 2.0 * _fp(self.log_scale).sum(-1)
        return 2.0 * _fp(self.scale_tril_raw).diagonal(dim1=-2, dim2=-1).sum(-1)

    def covariance_matrix(self) -> Tensor:
        """Dense ``Sigma`` per slot, ``[H, K, d, d]`` (for analysis and tests, not the hot path)."""
        lower = self.scale_tril()
        return lower @ lower.transpose(-1, -2)

    # ----------------------------------------------------------------- features
    def slot_bias(self) -> Tensor:
        """The query-independent part of every log-feature, ``[H, K]``: ``½ log a`` (+ normaliser)."""
        bias = 0.5 * _fp(self.log_amplitude)
        if self.log_normalizer:
            log_det_2pi = self.head_dim * math.log(2 * math.pi) + self.log_det_covariance()
            bias = bias - 0.25 * log_det_2pi
        return bias

    def log_features(self, x: Tensor) -> Tensor:
        """``l_s(x)`` for every slot: ``x [..., H, n, d]`` -> ``[..., H, n, K]`` in fp32 (fp64 for fp64).

        Uses the expanded quadratic form (two matmuls) so the cost is one GEMM, clamped at zero
        against round-off. Dead slots give ``-inf`` and so receive no gradient.
        """
        if x.shape[-1] != self.head_dim or x.shape[-3] != self.n_heads:
            raise ValueError(
                f"expected inputs [..., {self.n_heads} heads, n, {self.head_dim}], got {tuple(x.shape)}"
            )
        mahalanobis = self.mahalanobis(x)
        logf = self.slot_bias().to(mahalanobis.dtype).unsqueeze(-2) - 0.5 * mahalanobis
        return logf.masked_fill(~self.alive.unsqueeze(-2), float("-inf"))

    def mahalanobis(self, x: Tensor) -> Tensor:
        """``(x - mu_s)^T Sigma_s^{-1} (x - mu_s)`` for every slot, ``[..., H, n, K]``, fp32."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        mu = self.centers.to(dtype)
        if self.covariance == "full":
            # y_s = L_s^{-1} x and m_s = L_s^{-1} mu_s, then ||y_s - m_s||^2.
            lower = self.scale_tril().to(dtype)
            eye = torch.eye(self.head_dim, device=x.device, dtype=dtype).expand_as(lower)
            inv = torch.linalg.solve_triangular(lower, eye, upper=False)  # [H, K, d, d]
            proj = torch.einsum("...hnd,hked->...hnke", x, inv)
            white_mu = torch.einsum("hked,hkd->hke", inv, mu)
            return (proj - white_mu.unsqueeze(-3)).square().sum(-1)
        inv_var = (-2.0 * self.log_scale.to(dtype)).exp()
        if self.covariance == "isotropic":
            x_sq = x.square().sum(-1, keepdim=True) * inv_var.unsqueeze(-2)
            cross = (x @ mu.transpose(-1, -2)) * inv_var.unsqueeze(-2)
            mu_sq = (mu.square().sum(-1) * inv_var).unsqueeze(-2)
        else:
            x_sq = x.square() @ inv_var.transpose(-1, -2)
            cross = x @ (mu * inv_var).transpose(-1, -2)
            mu_sq = (mu.square() * inv_var).sum(-1).unsqueeze(-2)
        return (x_sq - 2.0 * cross + mu_sq).clamp_min(0.0)

    # ----------------------------------------------------------------- in-place slot edits
    @torch.no_grad()
    def write_slots(
        self,
        heads: Tensor,
        slots: Tensor,
        *,
        centers: Tensor,
        log_amplitude: Tensor,
        log_scale: Tensor | None = None,
        scale_tril_raw: Tensor | None = None,
    ) -> None:
        """Write new Gaussians into ``(heads[i], slots[i])`` and mark them alive."""
        heads, slots = heads.long(), slots.long()
        self.centers[heads, slots] = centers.to(self.centers)
        self.log_amplitude[heads, slots] = log_amplitude.to(self.log_amplitude)
        if self.covariance == "full":
            if scale_tril_raw is None:
                raise ValueError("full-covariance banks need scale_tril_raw for every written slot")
            self.scale_tril_raw[heads, slots] = scale_tril_raw.to(self.scale_tril_raw)
        else:
            if log_scale is None:
                raise ValueError(f"{self.covariance} banks need log_scale for every written slot")
            self.log_scale[heads, slots] = log_scale.to(self.log_scale)
        self.alive[heads, slots] = True

    @torch.no_grad()
    def kill_slots(self, dead: Tensor) -> None:
        """Clear the alive bit of every slot where ``dead [H, K]`` is True."""
        self.alive &= ~dead.to(torch.bool)

    def shape_params(self) -> Tensor:
        """The covariance parameter tensor (``log_scale`` or ``scale_tril_raw``)."""
        return self.scale_tril_raw if self.covariance == "full" else self.log_scale

    def slot_parameters(self) -> dict[str, Tensor]:
        """Every per-slot parameter by name; leading dims are ``[H, K]``."""
        shape_name = "scale_tril_raw" if self.covariance == "full" else "log_scale"
        return {
            "centers": self.centers,
            "log_amplitude": self.log_amplitude,
            shape_name: self.shape_params(),
        }

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, head_dim={self.head_dim}, capacity={self.capacity}, "
            f"covariance={self.covariance!r}, log_normalizer={self.log_normalizer}"
        )
