"""The splat bank: fixed-capacity Gaussian splats per head, with an ``alive`` mask.

Shapes never change after construction (DESIGN.md section 3): death clears a bit, birth writes a
dead slot in place, so optimizers, DDP, ``torch.compile`` and checkpoints keep working.
Every parameter value is a valid Gaussian: scales are stored as logs and full covariances as a
lower-triangular factor whose diagonal is stored as a log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

    def feature_map(self, dtype: torch.dtype = torch.float32) -> FeatureMap:
        """The bank's constants for :meth:`log_features` derived once, as a :class:`FeatureMap`.

        Why: a backend calls the features of many blocks of q and k in one forward; this derives the
        GEMM weights (scales, centres, normaliser, whitening factors) once per forward instead of once
        per call, and evaluates the features as one matmul per block (see :class:`FeatureMap` for the
        arithmetic and its rounding). Differentiable in the bank's parameters; build it again after
        the parameters change (an optimizer step, a birth or death).
        """
        d = self.head_dim
        mu = self.centers.to(dtype)
        alive = self.alive
        # the centre: mean of each head's alive centres (detached: the features do not depend on it)
        w_alive = alive.to(dtype).unsqueeze(-1)
        centre = ((mu.detach() * w_alive).sum(-2, keepdim=True) / w_alive.sum(-2, keepdim=True).clamp_min(1.0))
        mu_c = mu - centre  # [H, K, d]
        bias = self.slot_bias().to(dtype)  # [H, K]
        if self.covariance == "full":
            lower = self.scale_tril().to(dtype)
            eye = torch.eye(d, device=mu.device, dtype=dtype).expand_as(lower)
            inv = torch.linalg.solve_triangular(lower, eye, upper=False)  # [H, K, d, d], one batched solve
            weight = inv.permute(0, 3, 1, 2).reshape(self.n_heads, d, self.capacity * d)  # [H, d, K·d]
            white_mu = torch.einsum("hked,hkd->hke", inv, mu_c).reshape(self.n_heads, 1, self.capacity * d)
            return FeatureMap("full", centre, weight, bias.masked_fill(~alive, float("-inf")).unsqueeze(-2), white_mu,
                              alive)
        inv_var = (-2.0 * _fp(self.log_scale).to(dtype)).exp()  # [H, K] or [H, K, d]
        if self.covariance == "isotropic":
            quad = (-0.5 * inv_var).unsqueeze(-2)  # [H, 1, K]: the |x|^2 row
            lin = (mu_c * inv_var.unsqueeze(-1)).transpose(-1, -2)  # [H, d, K]
            const = bias - 0.5 * mu_c.square().sum(-1) * inv_var
        else:
            quad = (-0.5 * inv_var).transpose(-1, -2)  # [H, d, K]: the x^2 rows
            lin = (mu_c * inv_var).transpose(-1, -2)
            const = bias - 0.5 * (mu_c.square() * inv_var).sum(-1)
        weight = torch.cat((quad, lin), dim=-2)  # [H, (1 or d) + d, K]
        bias = const.masked_fill(~alive, float("-inf")).unsqueeze(-2)  # [H, 1, K]: the constant row
        return FeatureMap(self.covariance, centre, weight, bias, None, alive)

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


@dataclass(frozen=True)
class FeatureMap:
    """A bank's log-feature map with its constants derived once (:meth:`SplatBank.feature_map`).

    Isotropic and diagonal banks: with ``x~ = x - c`` (``c`` each head's mean alive centre) the
    log-feature is one GEMM of the augmented vector ``[x~², x~, 1]`` (``[|x~|², x~, 1]`` for
    isotropic) against a ``[2d+1 (d+2), K]`` matrix whose rows are ``-½/σ²``, ``μ~/σ²`` and
    ``½ log a (+ normaliser) - ½ Σ μ~²/σ²``. The constant row is stored as ``bias [H, 1, K]`` and
    enters as the GEMM's accumulator (``baddbmm``): an even-width ``2d`` GEMM plus that bias measured
    faster than an odd-width ``2d+1`` one. Dead slots have bias ``-inf`` and finite weights, so
    their features are ``-inf`` and no NaN reaches any gradient. Full covariances: one GEMM
    ``y = x~ @ weight`` (``weight [H, d, K·d]`` the stacked ``L_s^{-1}``, from one batched triangular
    solve) and ``l = bias - ½ ||y_s - L_s^{-1} μ~_s||²`` (the direct form: nothing cancels).

    Rounding: the expanded form ``|x|² - 2x·μ + |μ|²`` cancels when ``x`` and ``μ`` are both far from
    the origin but near each other (a large shared offset, common in real models' q/k); its error is
    at most ``γ·½·Σ_i (|x_i| + |μ_i|)²/σ_i²`` (``γ ≈ (2d+1)·u``), against ``u·½·Σ (x_i - μ_i)²/σ_i²``
    for the direct form. Centring on ``c`` replaces ``|x|, |μ|`` by ``|x - c|, |μ - c|``, so a shared
    offset costs nothing; what remains is the spread of the centres around their mean, relative to
    ``σ``. ``tests/test_kernel_fused_features.py`` checks this bound against a float64 direct form.
    """

    kind: str
    centre: Tensor  # [H, 1, d], detached
    weight: Tensor  # [H, 2d (d+1), K]; full: [H, d, K·d]
    bias: Tensor  # [H, 1, K], -inf for dead slots
    white_centers: Tensor | None  # full: [H, 1, K·d]
    alive: Tensor  # [H, K] bool

    def augment(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``[x~², x~]`` (diagonal), ``[|x~|², x~]`` (isotropic) or ``x~`` (full), in the map's dtype.

        ``out``: a buffer of the result's shape to write into (reused across blocks: no allocation).
        """
        if out is None:
            xc = x.to(self.weight.dtype) - self.centre
            if self.kind == "full":
                return xc
            sq = xc.square() if self.kind == "diagonal" else xc.square().sum(-1, keepdim=True)
            return torch.cat((sq, xc), dim=-1)
        d = self.centre.shape[-1]
        if self.kind == "full":
            return torch.sub(x, self.centre, out=out)
        xc = torch.sub(x, self.centre, out=out[..., -d:])
        if self.kind == "diagonal":
            torch.mul(xc, xc, out=out[..., :d])
        else:
            torch.sum(xc.square(), -1, keepdim=True, out=out[..., :1])  # the same bits as without ``out``
        return out

    def vjp(self, x: Tensor, grad: Tensor, *, buffers: tuple[Tensor, Tensor] | None = None,
            out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The features' backward by hand (isotropic and diagonal kinds): ``(dx, d_weight, d_bias)`` for the
        gradient ``grad [..., H, n, K]`` of ``self(x)``.

        Why: a backend that recomputes features block by block in its backward (the ``kernel`` backend's
        hand-derived backward) gets these three GEMM-shaped products without building an autograd graph
        per block. ``grad`` must be zero at dead slots. ``buffers = (augmented, d_augmented)``, both
        ``[..., H, n, width()]``, and ``out`` (``dx``, ``x``'s shape) are written into instead of allocated.
        """
        if self.kind == "full":
            raise TypeError("vjp() is for isotropic and diagonal maps; use autograd for full covariances")
        d = self.centre.shape[-1]
        heads = self.weight.shape[0]
        xa = self.augment(x, None if buffers is None else buffers[0])
        g = grad.to(self.weight.dtype)
        w_t = self.weight.transpose(-1, -2)
        d_xa = g @ w_t if buffers is None else torch.matmul(g, w_t, out=buffers[1])  # [..., H, n, width]
        d_weight = (xa.transpose(-1, -2) @ g).reshape(-1, heads, *self.weight.shape[-2:]).sum(0)
        d_bias = g.reshape(-1, heads, g.shape[-2], g.shape[-1]).sum((0, 2)).unsqueeze(-2)
        quad = d_xa[..., :-d] if self.kind == "diagonal" else d_xa[..., :1]
        if out is not None and out.dtype == d_xa.dtype:
            return torch.addcmul(d_xa[..., -d:], xa[..., -d:], quad, value=2.0, out=out), d_weight, d_bias
        dx = torch.addcmul(d_xa[..., -d:], xa[..., -d:], quad, value=2.0).to(x.dtype)
        if out is not None:
            return out.copy_(dx), d_weight, d_bias
        return dx, d_weight, d_bias

    def width(self) -> int:
        """Columns of :meth:`augment`'s result: ``2d`` (diagonal), ``d + 1`` (isotropic), ``d`` (full)."""
        return self.weight.shape[-2]

    def __call__(self, x: Tensor, *, buffers: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``l_s(x)``: ``x [..., H, n, d]`` -> ``[..., H, n, K]``, equal to :meth:`SplatBank.log_features`
        up to rounding (dead slots ``-inf``).

        ``buffers = (augmented [..., H, n, width()], features [..., H, n, K])``: write into these instead of
        allocating (isotropic and diagonal kinds, without autograd); the result is the second buffer.
        """
        heads, dim = self.weight.shape[0], self.centre.shape[-1]
        if x.shape[-1] != dim or x.shape[-3] != heads:
            raise ValueError(f"expected inputs [..., {heads} heads, n, {dim}], got {tuple(x.shape)}")
        if self.kind == "full":
            k = self.alive.shape[-1]
            y = (self.augment(x) @ self.weight - self.white_centers).unflatten(-1, (k, dim))
            return self.bias - 0.5 * y.square().sum(-1)
        xa = self.augment(x, None if buffers is None else buffers[0])
        if xa.dim() == 3 or xa.shape[:-3].numel() == 1:  # one GEMM with the constant row as accumulator
            n, k = xa.shape[-2], self.weight.shape[-1]
            out = None if buffers is None else buffers[1].view(heads, n, k)
            res = torch.baddbmm(self.bias, xa.reshape(heads, n, xa.shape[-1]), self.weight, out=out)
            return res.view(*xa.shape[:-1], k)
        if buffers is None:
            return torch.matmul(xa, self.weight) + self.bias
        return torch.matmul(xa, self.weight, out=buffers[1]).add_(self.bias)
