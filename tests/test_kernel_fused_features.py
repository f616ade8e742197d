"""``SplatBank.feature_map()``: the fused log-features equal ``log_features`` within a rounding bound argued
from the GEMM (not from a lucky run), also where the expanded quadratic form cancels (a shared offset)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from gsa_core.bank import SplatBank

U32 = 2.0**-24  # fp32 unit round-off


def _bank(kind: str, heads: int, dim: int, capacity: int, seed: int, *, offset: float = 0.0, spread: float = 1.0,
          log_scale: tuple[float, float] = (-0.5, 0.5), dead: float = 0.0, normalizer: bool = False) -> SplatBank:
    bank = SplatBank(heads, dim, capacity, kind, log_normalizer=normalizer)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    lo, hi = log_scale
    with torch.no_grad():
        bank.centers.copy_(offset + spread * torch.randn(bank.centers.shape, generator=g))
        bank.log_amplitude.copy_(torch.randn(bank.log_amplitude.shape, generator=g) * 0.5)
        shape = bank.shape_params()
        if kind == "full":
            raw = torch.randn(shape.shape, generator=g) * 0.2
            raw.diagonal(dim1=-2, dim2=-1).copy_(lo + (hi - lo) * torch.rand(shape.shape[:-1], generator=g))
            shape.copy_(raw)
        else:
            shape.copy_(lo + (hi - lo) * torch.rand(shape.shape, generator=g))
        if dead:
            kill = torch.rand(bank.alive.shape, generator=g) < dead
            kill[:, 0] = False
            bank.alive.copy_(~kill)
    return bank


@torch.no_grad()
def _direct_and_bound(bank: SplatBank, x: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 direct form ``½ log a - ½ ||L⁻¹(x - μ)||²`` and the fp32 error bound of the fused form.

    The fused form evaluates, after centring on ``c``, a sum of ``m`` products (the GEMM's columns plus the
    constant row). A floating-point sum of products errs by at most ``γ_m·Σ|a_i b_i|`` (``γ_m ≈ m·u``),
    and every weight and augmented entry carries a few more roundings of its own (exp of the log-scale,
    the centring subtraction, squaring: at most ``4u`` relative each). With ``Σ|a_i b_i| ≤
    ½ Σ(|x~_i| + |μ~_i|)²/σ_i² + |bias|`` this gives ``(m + 8)·u·(½ Σ(|x~| + |μ~|)²/σ² + |bias|)``.
    Full covariances: the whitened ``|L⁻¹x~|`` and ``|L⁻¹μ~|`` take the place of the scaled entries, and
    the triangular solve adds ``d·u·κ(L)`` relative error (``κ`` the condition number).
    """
    xd = x.double()
    mu = bank.centers.double()
    alive = bank.alive
    c = (mu * alive.double().unsqueeze(-1)).sum(-2, keepdim=True) / alive.double().sum(-1)[..., None, None]
    bias = bank.slot_bias().double()
    d = bank.head_dim
    xc, mc = xd - c, mu - c  # [B, H, n, d], [H, K, d]
    if bank.covariance == "full":
        lower = bank.scale_tril().double()
        inv = torch.linalg.inv(lower)  # [H, K, d, d]
        y = torch.einsum("hked,bhnd->bhnke", inv, xc)
        w = torch.einsum("hked,hkd->hke", inv, mc)
        exact = bias.unsqueeze(-2) - 0.5 * (y - w.unsqueeze(-3)).square().sum(-1)
        kappa = torch.linalg.cond(lower)  # [H, K]
        size = 0.5 * (y.norm(dim=-1) + w.norm(dim=-1).unsqueeze(-2)).square() + bias.abs().unsqueeze(-2)
        bound = (2 * d + 8 + d * kappa.unsqueeze(-2)) * U32 * size
    else:
        s = bank.diag_scales().double()  # [H, K, d]
        exact = bias.unsqueeze(-2) - 0.5 * ((xd.unsqueeze(-2) - mu.unsqueeze(-3)) / s.unsqueeze(-3)).square().sum(-1)
        m = (1 if bank.covariance == "isotropic" else d) + d + 1
        size = 0.5 * ((xc.abs().unsqueeze(-2) + mc.abs().unsqueeze(-3)) / s.unsqueeze(-3)).square().sum(-1)
        bound = (m + 8) * U32 * (size + bias.abs().unsqueeze(-2))
    exact = exact.masked_fill(~alive.unsqueeze(-2), float("-inf"))
    return exact, bound


@torch.no_grad()
def _check(bank: SplatBank, x: Tensor) -> float:
    got = bank.feature_map()(x)
    assert got.dtype == torch.float32 and got.shape == (*x.shape[:-1], bank.capacity)
    exact, bound = _direct_and_bound(bank, x)
    dead = ~bank.alive.expand_as(exact[0, :, 0]).unsqueeze(-2).expand_as(exact)
    assert torch.isneginf(got[dead]).all()
    err = (got.double() - exact).abs()[~dead]
    assert (err <= bound[~dead]).all(), f"max excess {(err / bound[~dead]).max():.2f}x the bound"
    return float(err.max()) if err.numel() else 0.0


@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=st.sampled_from(("isotropic", "diagonal", "full")), heads=st.integers(1, 3),
       dim=st.sampled_from((2, 8, 32)), capacity=st.integers(1, 16), batch=st.integers(1, 2),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from((1e-3, 1.0, 30.0)), dead=st.sampled_from((0.0, 0.4)),
       normalizer=st.booleans())
def test_fused_features_within_rounding_bound(kind, heads, dim, capacity, batch, seed, scale, dead, normalizer) -> None:
    bank = _bank(kind, heads, dim, capacity, seed, spread=scale, dead=dead, normalizer=normalizer)
    x = scale * torch.randn(batch, heads, 9, dim, generator=torch.Generator().manual_seed(seed + 1))
    _check(bank, x)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
def test_shared_offset_does_not_cancel(kind: str) -> None:
    """q/k of real models share a large offset. With |offset| = 400 and σ ≈ 1, the uncentred expanded form's
    bound is ``(2d+9)·u·|offset|²·Σ1/σ² ≈ 3e-1``; centring removes the offset from the bound, and the
    error must stay within the centred bound (~1e-4 here), i.e. within a few ulps of the features' size."""
    d = 16
    offset = 400.0 / math.sqrt(d)  # per coordinate: |offset| = 400
    bank = _bank(kind, 2, d, 24, 3, offset=offset, log_scale=(-0.2, 0.2))
    x = offset + torch.randn(2, 2, 64, d, generator=torch.Generator().manual_seed(4))
    worst = _check(bank, x)
    exact, _ = _direct_and_bound(bank, x)
    typical = float(exact[torch.isfinite(exact)].abs().median())
    assert worst <= 100 * U32 * max(typical, 1.0) * d  # argued: a centred bound does not grow with the offset


def test_realistic_scales_fp32_vs_fp64() -> None:
    """The benchmark's bank (d = 64, σ² = d/2, N(0, I) centres and inputs) and a real-model-like one (shared
    offset 50, σ = 1): fp32 error stays at the rounding of the features themselves (within the bound)."""
    for offset, log_s in ((0.0, 0.5 * math.log(32)), (50.0 / 8, 0.0)):
        bank = _bank("diagonal", 4, 64, 64, 7, offset=offset, log_scale=(log_s - 0.1, log_s + 0.1))
        x = offset + torch.randn(1, 4, 256, 64, generator=torch.Generator().manual_seed(8))
        _check(bank, x)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
def test_gradients_match_log_features(kind: str) -> None:
    """Same function, so the same gradients (float64, where both forms are accurate to ~1e-13)."""
    bank = _bank(kind, 2, 4, 6, 11, dead=0.3, normalizer=True).double()
    x = torch.randn(2, 2, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(12), requires_grad=True)
    params = [x, *bank.slot_parameters().values()]
    ref, got = bank.log_features(x), bank.feature_map(torch.float64)(x)
    live = torch.isfinite(ref)
    assert torch.equal(live, torch.isfinite(got))
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    g_ref = torch.autograd.grad(ref.masked_fill(~live, 0).mul(weight).sum(), params)
    g_got = torch.autograd.grad(got.masked_fill(~live, 0).mul(weight).sum(), params)
    for a, b in zip(g_got, g_ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)  # fp64: ~1e-13 cancellation on O(1) terms


def test_bad_shape_is_one_clear_error() -> None:
    fmap = _bank("diagonal", 2, 4, 3, 0).feature_map()
    with pytest.raises(ValueError, match="2 heads, n, 4"):
        fmap(torch.zeros(1, 3, 5, 4))


@pytest.mark.parametrize("kind", ["isotropic", "diagonal"])
@pytest.mark.parametrize("batch", [1, 2])
def test_buffers_give_the_same_bits(kind: str, batch: int) -> None:
    """The allocation-free form (reused buffers, no autograd) computes the same values, bit for bit, as the
    differentiable form the backward recomputes (so the saved log-normalisers match the recomputed features)."""
    bank = _bank(kind, 3, 8, 10, 5, dead=0.3)
    fmap = bank.feature_map()
    x = torch.randn(batch, 3, 17, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = fmap(x)
        buffers = (torch.full((batch, 3, 17, fmap.width()), float("nan")), torch.full((batch, 3, 17, 10), float("nan")))
        got = fmap(x, buffers=buffers)
    assert got.data_ptr() == buffers[1].data_ptr()
    assert torch.equal(got, want)


def test_input_check_is_exact_on_its_fast_path() -> None:
    """``check_finite`` proves finiteness by one sum: finite values whose sum overflows still pass (exact pass),
    and a single NaN or ±inf anywhere in a large tensor is still named."""
    from gsa_core.errors import NonFiniteInputError
    from gsa_core.numerics import check_finite

    huge = torch.full((200, 200), 3e38)  # the sum overflows to inf; every value is finite
    check_finite(q=huge)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.zeros(200, 200)
        x[123, 45] = bad
        with pytest.raises(NonFiniteInputError, match=r"\[123, 45\]"):
            check_finite(q=huge, k=x)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal"])
@pytest.mark.parametrize("batch", [1, 2])
def test_vjp_equals_autograd(kind: str, batch: int) -> None:
    """The features' backward by hand (used block by block by the kernel backward) equals autograd's, in float64
    (same products, reassociated: ~1e-15), with and without output buffers; full covariances refuse it."""
    from gsa_core.bank import FeatureMap

    bank = _bank(kind, 3, 4, 6, 21, dead=0.3).double()
    fmap = bank.feature_map(torch.float64)
    weight, bias = fmap.weight.detach().requires_grad_(), fmap.bias.detach().requires_grad_()
    leaf = FeatureMap(fmap.kind, fmap.centre, weight, bias, None, fmap.alive)
    x = torch.randn(batch, 3, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    x.requires_grad_()
    g = torch.randn(batch, 3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    g = g.masked_fill(~fmap.alive.unsqueeze(-2), 0.0)  # the contract: no gradient at dead slots
    want = torch.autograd.grad(leaf(x), (x, weight, bias), g)
    with torch.no_grad():
        plain = leaf.vjp(x, g)
        wide = (batch, 3, 7, leaf.width())
        out = torch.empty_like(x)
        bufs = (torch.empty(wide, dtype=torch.float64), torch.empty(wide, dtype=torch.float64))
        buffered = leaf.vjp(x, g, buffers=bufs, out=out)
    assert buffered[0].data_ptr() == out.data_ptr()
    for got in (plain, buffered):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="full"):
        _bank("full", 1, 2, 2, 0).feature_map().vjp(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("batch", [1, 2])
def test_empty_inputs(kind: str, batch: int) -> None:
    """n = 0 (empty sequences are accepted everywhere): an empty ``[..., H, 0, K]``, not a reshape error."""
    fmap = _bank(kind, 2, 3, 4, 0).feature_map()
    assert fmap(torch.zeros(batch, 2, 0, 3)).shape == (batch, 2, 0, 4)
