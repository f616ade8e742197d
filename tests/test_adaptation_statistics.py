"""Per-slot statistics: the routing decomposition is exact for every mask, windows follow slot ages,
coverage and metrics say what they claim."""

from __future__ import annotations

import math

import pytest
import torch

from gsa_core.adaptation import (
    SlotStatistics,
    bank_metrics,
    coverage_map,
    coverage_report,
    effective_slots,
    mass_entropy,
    slot_mass,
    slot_routing,
    uncovered_points,
)
from gsa_core.masks import MaskSpec
from gsa_core.numerics import safe_softmax
from gsa_core.testing import BankSpec, padding_mask, random_qkv
from gsa_plugins.backends.dense import DenseBackend


def _bank(covariance="diagonal", dead_fraction=0.3, seed=0, heads=2, dim=4, capacity=6):
    return BankSpec(heads, dim, capacity, covariance, seed, dead_fraction=dead_fraction).make()


def _routed_output(bank, q, k, v, mask):
    """``Σ_s π_ts M_{s,t}`` with ``M_{s,t}`` the softmax over visible keys of ``l_s(k_j)`` times ``v_j``."""
    pi = slot_routing(bank, q, k, mask)
    lk = bank.log_features(k)
    if mask.key_padding is not None:
        lk = lk.masked_fill(~mask.key_padding[:, None, :, None], float("-inf"))
    allowed = mask.allowed(q.shape[-2], k.shape[-2])  # [B|1, 1, n_q, n_k]
    logits = lk.unsqueeze(-4 + 1).transpose(-1, -2)  # [B, H, 1, K, n_k]
    logits = logits.expand(-1, -1, q.shape[-2], -1, -1)
    logits = logits.masked_fill(~allowed.unsqueeze(-2), float("-inf"))
    weights = safe_softmax(logits, dim=-1)  # [B, H, n_q, K, n_k]
    memory = weights @ v.unsqueeze(2)  # [B, H, n_q, K, d_v]
    return (pi.unsqueeze(-1) * memory).sum(-2)


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("kind", ["none", "causal", "window", "padding", "cross", "arbitrary"])
def test_routing_reproduces_the_dense_output_exactly(covariance, kind):
    bank = _bank(covariance, seed=3)
    n_k = 7 if kind == "cross" else 9
    q, k, v = random_qkv(bank, 2, 9, n_k, 3, seed=5)
    mask = {
        "none": MaskSpec(),
        "causal": MaskSpec(causal=True),
        "window": MaskSpec(causal=True, window=3),
        "padding": MaskSpec(causal=True, key_padding=padding_mask(2, 9, 1), query_padding=padding_mask(2, 9, 2)),
        "cross": MaskSpec(key_padding=padding_mask(2, 7, 3)),
        "arbitrary": MaskSpec(attend=torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.4),
    }[kind]
    ref, _ = DenseBackend().forward(q.double(), k.double(), v.double(), bank.double(), mask)
    routed = _routed_output(bank.double(), q.double(), k.double(), v.double(), mask)
    assert torch.allclose(routed, ref, atol=1e-9), (routed - ref).abs().max()
    pi = slot_routing(bank, q, k, mask)
    sums = pi.sum(-1)
    assert torch.allclose(sums[sums > 0], torch.ones_like(sums[sums > 0]), atol=1e-5)
    assert (pi[..., ~bank.alive[0]] == 0).all() if bank.n_heads == 1 else (pi.sum((0, 2))[~bank.alive] == 0).all()


def test_slot_mass_counts_real_queries_and_hits():
    bank = _bank(seed=1)
    q, k, _ = random_qkv(bank, 3, 10, 10, 2, seed=2)
    qpad = padding_mask(3, 10, 4)
    mask = MaskSpec(causal=True, query_padding=qpad)
    mass, hits, count = slot_mass(bank, q, k, mask)
    assert torch.allclose(count, torch.full((bank.n_heads,), float(qpad.sum())))
    assert torch.allclose(mass.sum(-1), count, atol=1e-4)
    assert torch.equal(hits.sum(-1), count)
    assert (mass[~bank.alive] == 0).all() and (hits[~bank.alive] == 0).all()
    sub_mass, _, sub_count = slot_mass(bank, q, k, mask, max_queries=4)
    assert (sub_count <= count).all() and torch.allclose(sub_mass.sum(-1), sub_count, atol=1e-4)


def _train_step(bank, stats, q, k, mask=None):
    stats.observe(q, k, mask)
    bank.centers.grad = torch.randn_like(bank.centers) * bank.alive.unsqueeze(-1)
    assert stats.accumulate()


def test_window_means_follow_slot_age_and_forget():
    bank = _bank(dead_fraction=0.0, seed=4)
    stats = SlotStatistics(bank, window=4)
    q, k, _ = random_qkv(bank, 2, 8, 8, 2, seed=1)
    for _ in range(6):
        _train_step(bank, stats, q, k)
    s = stats.stats()
    assert s.steps == 4 and (s.age == 4).all()
    assert torch.allclose(s.mass.sum(-1), torch.ones(bank.n_heads), atol=1e-4)  # a distribution per head
    written = torch.zeros_like(bank.alive)
    written[0, 1] = True
    stats.forget(written)
    s = stats.stats()
    assert s.age[0, 1] == 0 and s.mass[0, 1] == 0 and s.grad_norm[0, 1] == 0
    _train_step(bank, stats, q, k)
    s = stats.stats()
    one_step = stats.mass.latest()[0, 1]
    assert s.age[0, 1] == 1 and torch.isclose(s.mass[0, 1], one_step)  # judged on its own step only
    assert s.coverage is not None and s.coverage.shape == (bank.n_heads,)
    assert s.gap_points.shape[0] == bank.n_heads and s.gap_points.shape[-1] == bank.head_dim


def test_nothing_recorded_without_use_or_gradient_and_reset():
    bank = _bank(seed=2)
    stats = SlotStatistics(bank, window=3)
    assert not stats.accumulate() and stats.steps == 0
    q, k, _ = random_qkv(bank, 1, 5, 5, 2, seed=0)
    _train_step(bank, stats, q, k)
    assert stats.steps == 1
    stats.reset()
    assert len(stats.mass) == 0 and (stats.age == 0).all()
    state = stats.state_dict()
    other = SlotStatistics(bank, window=3)
    other.load_state_dict(state)
    assert other.steps == 1


def test_gap_distances_are_recomputed_against_the_current_bank():
    bank = _bank(dead_fraction=0.0, seed=0, heads=1, capacity=3)
    stats = SlotStatistics(bank, window=3, gap_points=4)
    far = torch.full((1, 1, 4, bank.head_dim), 50.0)
    _train_step(bank, stats, far, far)
    assert stats.stats().gap_dist.max() > 10
    with torch.no_grad():
        bank.centers[0, 0] = 50.0  # a splat now sits on the gap
    assert stats.stats().gap_dist.max() < 5


def test_coverage_analysis():
    bank = _bank(dead_fraction=0.0, seed=0, heads=2)
    near = bank.centers.detach()[:, :3].unsqueeze(0)  # [1, H, 3, d]: on splat centers
    far = near + 100.0
    cmap = coverage_map(bank, torch.cat([near, far], -2))
    assert cmap.covered[..., :3].all() and not cmap.covered[..., 3:].any()
    assert torch.allclose(cmap.fraction(), torch.full((2,), 0.5))
    assert (cmap.nearest[..., :3] == torch.arange(3)).all()
    report = coverage_report(bank, near, far)
    assert report["queries"]["covered"] == 1.0 and report["keys"]["covered"] == 0.0
    pts, dist = uncovered_points(bank, torch.cat([near, far], -2), max_points=5)
    assert pts.shape == (2, 5, bank.head_dim)
    assert (dist[:, :3] > 10).all() and torch.isinf(dist[:, 3:]).all()
    bank.alive.zero_()
    assert (coverage_map(bank, near).nearest == -1).all()


def test_mass_metrics():
    alive = torch.tensor([[True, True, True, True], [True, True, False, False], [True, False, False, False]])
    mass = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 5.0, 5.0], [3.0, 0.0, 0.0, 0.0]])
    ent = mass_entropy(mass, alive)
    assert ent[0] == pytest.approx(1.0) and ent[1] == pytest.approx(0.0, abs=1e-6) and ent[2] == 0.0
    assert effective_slots(mass, alive)[0] == pytest.approx(4.0)
    bank = _bank(dead_fraction=0.0, seed=0)
    stats = SlotStatistics(bank, window=2)
    q, k, _ = random_qkv(bank, 1, 6, 6, 2, seed=0)
    _train_step(bank, stats, q, k)
    m = bank_metrics(bank, stats.stats())
    assert m["alive"] == bank.n_heads * bank.capacity and 0.0 <= m["mass_entropy"] <= 1.0 + 1e-6
    assert 0.0 <= m["coverage"] <= 1.0 and not math.isnan(m["mean_grad_norm"])

