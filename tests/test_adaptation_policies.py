"""Birth, death and scheduler plugins: every registered one passes the conformance kit, and each
does what its name promises."""

from __future__ import annotations

import math

import pytest
import torch

from gsa_core.adaptation import WindowStats, limit_deaths
from gsa_core.protocols import Births, SlotStats
from gsa_core.registry import get_registry
from gsa_core.testing import (
    BankSpec,
    adaptation_stats,
    apply_births,
    check_birth_policy,
    check_death_policy,
    check_scheduler,
)

NEW = {
    "birth": ["clone", "split", "coverage", "relocate"],
    "death": ["low-mass", "redundant", "amplitude-floor", "any"],
    "scheduler": ["interval", "decaying", "shift"],
}
CHECK = {"birth": check_birth_policy, "death": check_death_policy, "scheduler": check_scheduler}


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, names in NEW.items() for n in names])
def test_registered_policy_passes_the_kit(kind, name):
    registry = get_registry()
    assert name in registry.names(kind)
    CHECK[kind](registry.build(kind, name), max_examples=12)


@pytest.mark.parametrize(("name", "params"), [
    ("split", {"split_ratio": 0.5, "preserve_mass": True}),  # splits nearly everything
    ("relocate", {"weight": "amplitude", "max_per_head": 2}),
    ("coverage", {"radius": 0.5, "relative_radius": None, "min_separation": 0.0}),
])
def test_variants_pass_the_kit(name, params):
    check_birth_policy(get_registry().build("birth", name, params), max_examples=10)


def _bank(dead=(), heads=1, capacity=6, dim=4, covariance="diagonal", seed=0):
    bank = BankSpec(heads, dim, capacity, covariance, seed).make()
    for h, s in dead:
        bank.alive[h, s] = False
    return bank


def _stats(bank, mass=None, grad=None, steps=5):
    z = torch.zeros(bank.alive.shape)
    return SlotStats(mass=z + 1 if mass is None else mass, grad_norm=z if grad is None else grad, hits=z, steps=steps)


# ----------------------------------------------------------------------------- births
@pytest.mark.parametrize("covariance", ["isotropic", "diagonal", "full"])
def test_split_halves_large_splats_and_preserves_mass(covariance):
    bank = _bank(dead=[(0, 4), (0, 5)], covariance=covariance)
    with torch.no_grad():
        if covariance == "full":
            bank.scale_tril_raw.zero_()
            bank.scale_tril_raw[0, 0].diagonal().fill_(math.log(4.0))  # slot 0 is large
        else:
            bank.log_scale.zero_()
            bank.log_scale[0, 0] = math.log(4.0)
    grad = torch.tensor([[5.0, 4.0, 0.1, 0.1, 0.0, 0.0]])
    policy = get_registry().build("birth", "split", {"max_per_head": 2})
    before_amp = bank.log_amplitude.detach().exp().clone()
    before_mu = bank.centers.detach().clone()
    births = policy.propose(bank, _stats(bank, grad=grad), generator=torch.Generator().manual_seed(0))
    assert births.sources.tolist() == [0, 1] and births.slots.tolist() == [4, 5]
    apply_births(bank, births)
    amp = bank.log_amplitude.detach().exp()
    assert torch.allclose(amp[0, 0] + amp[0, 4], before_amp[0, 0]) and torch.allclose(amp[0, 1] + amp[0, 5],
                                                                                      before_amp[0, 1])
    # the large one was split: both halves moved symmetrically and shrank; the small one was cloned
    assert torch.allclose(bank.centers[0, 0] + bank.centers[0, 4], 2 * before_mu[0, 0], atol=1e-5)
    assert not torch.allclose(bank.centers[0, 0], before_mu[0, 0])
    assert torch.allclose(bank.centers[0, 1], before_mu[0, 1])
    size = bank.log_det_covariance().detach() / (2 * bank.head_dim)
    assert size[0, 0] == pytest.approx(math.log(4.0 / 1.6), abs=1e-5) and size[0, 4] == pytest.approx(size[0, 0])


def test_coverage_seeds_distinct_gaps_with_typical_shape():
    bank = _bank(dead=[(0, 3), (0, 4), (0, 5)], capacity=6)
    with torch.no_grad():
        bank.centers.zero_()
        bank.log_scale.zero_()
    gap_a, gap_b = torch.full((4,), 20.0), torch.full((4,), -20.0)
    points = torch.stack([gap_a, gap_a + 0.01, gap_b, torch.zeros(4)]).unsqueeze(0)
    dist = torch.tensor([[20.0, 20.01, 20.0, 0.0]])
    stats = WindowStats(mass=torch.ones(1, 6), grad_norm=torch.zeros(1, 6), hits=torch.zeros(1, 6), steps=3,
                        gap_points=points, gap_dist=dist, typical_distance=torch.tensor([0.5]))
    births = get_registry().build("birth", "coverage").propose(bank, stats, generator=torch.Generator())
    assert len(births) == 2  # the near-duplicate gap and the covered token are skipped
    assert {tuple(c.round().tolist()) for c in births.centers} == {(20.0,) * 4, (-20.0,) * 4}
    assert (births.sources == -1).all() and torch.allclose(births.shape, torch.zeros(2, 4))
    # a plain SlotStats has no gaps: no births
    assert len(get_registry().build("birth", "coverage").propose(bank, _stats(bank), generator=torch.Generator())) == 0


def test_relocate_fills_every_dead_slot_from_heavy_sources():
    bank = _bank(dead=[(0, 2), (0, 3), (0, 4), (0, 5)])
    mass = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    births = get_registry().build("birth", "relocate", {"jitter": 0.0}).propose(
        bank, _stats(bank, mass=mass), generator=torch.Generator().manual_seed(1))
    assert sorted(births.slots.tolist()) == [2, 3, 4, 5] and (births.sources == 0).all()
    before = bank.log_amplitude.detach().exp()[0, 0].clone()
    apply_births(bank, births)
    amp = bank.log_amplitude.detach().exp()[0]
    assert torch.allclose(amp[[0, 2, 3, 4, 5]], (before / 5).expand(5))  # shared five ways
    assert torch.allclose(bank.centers[0, 2], bank.centers[0, 0])


# ----------------------------------------------------------------------------- deaths
def test_redundant_keeps_the_heaviest_of_duplicates():
    bank = _bank(capacity=4)
    with torch.no_grad():
        bank.log_scale.zero_()
        bank.centers.copy_(torch.tensor([[[0.0] * 4, [0.01] * 4, [5.0] * 4, [0.0] * 4]]))
    mass = torch.tensor([[0.1, 0.5, 0.2, 0.3]])
    dead = get_registry().build("death", "redundant").select(bank, _stats(bank, mass=mass))
    assert dead.tolist() == [[True, False, False, True]]  # slot 1 is the heaviest of {0, 1, 3}


def test_amplitude_floor_absolute_and_relative():
    bank = _bank(capacity=4, dead=[(0, 3)])
    with torch.no_grad():
        bank.log_amplitude.copy_(torch.tensor([[0.0, -5.0, -20.0, -30.0]]))
    reg = get_registry()
    assert reg.build("death", "amplitude-floor").select(bank, _stats(bank)).tolist() == [[False, False, True, False]]
    rel = reg.build("death", "amplitude-floor", {"min_log_amplitude": None, "max_log_ratio": 4.0})
    assert rel.select(bank, _stats(bank)).tolist() == [[False, True, True, False]]


def test_any_combines_and_validates():
    bank = _bank(capacity=4)
    with torch.no_grad():
        bank.log_amplitude.copy_(torch.tensor([[0.0, 0.0, -20.0, 0.0]]))
    mass = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    policy = get_registry().build("death", "any", {"policies": [{"name": "low-mass"}, {"name": "amplitude-floor"}]})
    assert policy.select(bank, _stats(bank, mass=mass)).tolist() == [[False, True, True, False]]
    with pytest.raises(Exception, match="nest"):
        get_registry().build("death", "any", {"policies": [{"name": "any"}]})


def test_limit_deaths_spares_the_heaviest():
    alive = torch.ones(2, 4, dtype=torch.bool)
    dead = torch.tensor([[True, True, True, True], [True, False, False, False]])
    mass = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.0, 1.0, 1.0, 1.0]])
    limited = limit_deaths(alive, dead, 2, priority=mass)
    assert limited.tolist() == [[True, False, False, True], [True, False, False, False]]


# ----------------------------------------------------------------------------- schedulers
def test_decaying_schedule_spreads_out():
    sched = get_registry().build("scheduler", "decaying", {"start": 10, "every": 10, "growth": 2.0, "stop": 200})
    steps = [s for s in range(300) if sched.should_refine(s)]
    assert steps == [10, 20, 40, 80, 160]
    capped = get_registry().build("scheduler", "decaying", {"start": 0, "every": 5, "growth": 2.0, "max_every": 20})
    assert [s for s in range(100) if capped.should_refine(s)] == [0, 5, 15, 35, 55, 75, 95]
    flat = get_registry().build("scheduler", "decaying", {"start": 0, "every": 3, "growth": 1.0})
    assert [s for s in range(10) if flat.should_refine(s)] == [0, 3, 6, 9]


def test_shift_scheduler_bursts_after_a_shift():
    sched = get_registry().build("scheduler", "shift", {"delay": 5, "burst": 3, "burst_every": 10})
    assert not any(sched.should_refine(s, {"shift": 0.0}) for s in range(100))
    fired = [s for s in range(100) if sched.should_refine(s, {"steps_since_shift": float(s - 40)} if s >= 40 else {})]
    assert fired == [45, 55, 65]
    every = get_registry().build("scheduler", "shift", {"every": 25, "start": 0})
    assert [s for s in range(60) if every.should_refine(s, None)] == [0, 25, 50]


def test_kit_catches_broken_births():
    class IntoAlive:
        def propose(self, bank, stats, *, generator):
            b = Births.empty(bank)
            return Births(heads=torch.tensor([0]), slots=torch.tensor([0]), centers=torch.zeros(1, bank.head_dim),
                          log_amplitude=torch.zeros(1), shape=bank.shape_params()[0, :1].detach().clone(),
                          sources=torch.tensor([-1]), source_log_amplitude=torch.zeros(1)) if bank.alive[0, 0] else b

    class LeakyClone:
        preserves_mass = True

        def propose(self, bank, stats, *, generator):
            return get_registry().build("birth", "clone").propose(bank, stats, generator=generator)

    with pytest.raises(AssertionError, match="alive slot"):
        check_birth_policy(IntoAlive(), max_examples=5)
    with pytest.raises(AssertionError, match="mass-preserving"):
        check_birth_policy(LeakyClone(), max_examples=20)


def test_adaptation_stats_carry_gaps():
    bank = BankSpec(2, 4, 5, "diagonal", 0).make()
    stats = adaptation_stats(bank, 3)
    assert isinstance(stats, WindowStats) and stats.gap_points.shape == (2, 12, 4)
    assert (stats.gap_dist[:, 6:10] > stats.gap_dist[:, :6].max()).all()  # the far half is far
