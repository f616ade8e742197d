"""Splat bank invariants: valid covariances for any parameters, exact features, dead slots inert."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.bank import SplatBank
from gsa_core.testing import bank_specs


def naive_log_features(bank: SplatBank, x: torch.Tensor) -> torch.Tensor:
    """Direct ``(x - mu)^T Sigma^{-1} (x - mu)`` in float64 with an explicit inverse."""
    sigma = bank.covariance_matrix().double()
    diff = x.double().unsqueeze(-2) - bank.centers.double().unsqueeze(-3)  # [B,H,n,K,d]
    maha = torch.einsum("bhnkd,hkde,bhnke->bhnk", diff, torch.linalg.inv(sigma), diff)
    out = 0.5 * bank.log_amplitude.double().unsqueeze(-2) - 0.5 * maha
    if bank.log_normalizer:
        out = out - 0.25 * torch.logdet(2 * math.pi * sigma).unsqueeze(-2)
    return out.masked_fill(~bank.alive.unsqueeze(-2), float("-inf"))


@settings(max_examples=40, deadline=None)
@given(spec=bank_specs(), seed=st.integers(0, 1000))
def test_log_features_match_the_definition(spec, seed):
    bank = spec.make()
    x = torch.randn(2, bank.n_heads, 5, bank.head_dim, generator=torch.Generator().manual_seed(seed))
    got, want = bank.log_features(x), naive_log_features(bank, x)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(spec=bank_specs(), raw=st.floats(-20, 20))
def test_any_parameter_value_is_a_valid_covariance(spec, raw):
    bank = spec.make()
    with torch.no_grad():
        bank.shape_params().add_(raw)
    lower = bank.scale_tril().double()
    # Sigma = L L^T is positive definite exactly when L is lower-triangular with a positive diagonal.
    assert torch.equal(lower, lower.tril())
    diag = lower.diagonal(dim1=-2, dim2=-1)
    assert (diag > 0).all() and torch.isfinite(lower).all()
    torch.testing.assert_close(bank.log_det_covariance().double(), 2 * diag.log().sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_features_are_fp32_whatever_the_input(dtype):
    bank = SplatBank(2, 4, 3)
    assert bank.log_features(torch.randn(1, 2, 3, 4).to(dtype)).dtype == torch.float32


def test_dead_slots_are_minus_inf_and_get_no_gradient():
    bank = SplatBank(2, 4, 5, "full")
    bank.kill_slots(torch.tensor([[False, True, False, False, True]] * 2))
    f = bank.log_features(torch.randn(1, 2, 3, 4))
    assert torch.isinf(f[..., [1, 4]]).all() and torch.isfinite(f[..., [0, 2, 3]]).all()
    torch.logsumexp(f, -1).sum().backward()
    for p in bank.slot_parameters().values():
        assert (p.grad[:, [1, 4]] == 0).all()


def test_write_slots_revives_and_writes_in_place():
    bank = SplatBank(1, 2, 3, "isotropic")
    bank.kill_slots(torch.ones(1, 3, dtype=torch.bool))
    ptr = bank.centers.data_ptr()
    bank.write_slots(torch.tensor([0]), torch.tensor([2]), centers=torch.tensor([[1.0, 2.0]]),
                     log_amplitude=torch.tensor([0.5]), log_scale=torch.tensor([-1.0]))
    assert bank.alive.tolist() == [[False, False, True]]
    assert bank.centers[0, 2].tolist() == [1.0, 2.0] and bank.centers.data_ptr() == ptr
    with pytest.raises(ValueError, match="isotropic banks need log_scale"):
        bank.write_slots(torch.tensor([0]), torch.tensor([0]), centers=torch.zeros(1, 2),
                         log_amplitude=torch.zeros(1))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"capacity": 0}, "capacity must be a positive integer"),
    ({"covariance": "spherical"}, "valid kinds: isotropic, diagonal, full"),
    ({"init_scale": -1.0}, "init_scale must be a positive finite number"),
])
def test_constructor_errors(kwargs, message):
    args = {"n_heads": 2, "head_dim": 4, "capacity": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        SplatBank(**args)


def test_wrong_input_shape_is_named():
    with pytest.raises(ValueError, match=r"expected inputs \[\.\.\., 2 heads, n, 4\], got \(1, 3, 5, 4\)"):
        SplatBank(2, 4, 3).log_features(torch.randn(1, 3, 5, 4))
