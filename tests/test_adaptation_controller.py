"""The adaptation controller: scheduler -> death -> birth in place, with its invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsa_core.adaptation import AdaptationController, AdaptationError, find_banks
from gsa_core.attention import GSAAttention, GSAMultiheadAttention
from gsa_core.config import GSAConfig
from gsa_core.masks import MaskSpec
from gsa_core.protocols import Births
from gsa_core.synthetic import ClusteredStream
from gsa_core.testing import check_controller


def config(birth="relocate", death="low-mass", scheduler=None, min_alive=2, splats=8, **extra):
    return GSAConfig.from_dict({
        "seed": extra.pop("seed", 0),
        "bank": {"n_splats": splats, "min_alive": min_alive, "covariance": extra.pop("covariance", "diagonal")},
        "backend": "dense",
        "adaptation": {"enabled": True, "window": 4,
                       "scheduler": scheduler or {"name": "interval", "params": {"start": 2, "every": 2}},
                       "death": death, "birth": birth},
    })


class TwoLayers(nn.Module):
    """Two GSA layers (one causal) on fixed projections, enough to exercise several banks."""

    def __init__(self, cfg):
        super().__init__()
        self.a = GSAAttention(2, 4, cfg)
        self.b = GSAMultiheadAttention(8, 2, config=cfg)

    def forward(self, x):
        b, n, _ = x.shape
        q = x.view(b, n, 2, 4).transpose(1, 2)
        h = self.a(q, q, q, MaskSpec(causal=True)).transpose(1, 2).reshape(b, n, 8)
        return self.b(h, is_causal=True)[0]


def make(cfg):
    def build():
        torch.manual_seed(0)
        return TwoLayers(cfg)
    return build


def loss_fn(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(2, 8, 8, generator=g) * 2
    return (model(x) - x).square().mean()


@pytest.mark.parametrize(("birth", "death"), [
    ("relocate", "low-mass"),
    ({"name": "split", "params": {"split_ratio": 1.0}}, {"name": "low-mass", "params": {"relative_threshold": 0.5}}),
    ({"name": "coverage", "params": {"radius": 0.5}}, {"name": "any", "params": {"policies": [
        {"name": "low-mass", "params": {"relative_threshold": 0.5}}, {"name": "redundant"}]}}),
    ("clone", {"name": "amplitude-floor", "params": {"min_log_amplitude": 10.0}}),  # kills all it may
])
def test_controller_kit(birth, death):
    controller = check_controller(make(config(birth=birth, death=death)), loss_fn, config(birth=birth, death=death),
                                  steps=7)
    assert controller.refines == 3
    assert sum(r.deaths for r in controller.history) > 0


@pytest.mark.parametrize("covariance", ["isotropic", "full"])
def test_controller_kit_other_covariances(covariance):
    cfg = config(birth="split", death={"name": "low-mass", "params": {"relative_threshold": 0.5}},
                 covariance=covariance)
    controller = check_controller(make(cfg), loss_fn, cfg, steps=5, check_determinism=False)
    assert sum(r.births for r in controller.history) > 0


def test_alive_minimum_holds_when_the_policy_kills_everything():
    cfg = config(birth="clone", death={"name": "amplitude-floor", "params": {"min_log_amplitude": 100.0}},
                 min_alive=3)
    model = make(cfg)()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(UserWarning, match="not Adam"):
        ctl = AdaptationController(model, cfg, opt)
    ctl.refine(0)
    for _, bank in find_banks(model):
        assert (bank.alive.sum(-1) == 3).all()


def test_disabled_controller_is_inert():
    cfg = config().with_updates(adaptation={"enabled": False})
    model = make(cfg)()
    ctl = AdaptationController(model, cfg, torch.optim.Adam(model.parameters()))
    loss_fn(model, 0).backward()
    ctl.after_backward(0)
    assert ctl.step(2) is None and all(t.stats.steps == 0 and not t.hooks for t in ctl.banks)


def test_statistics_come_from_the_forward_hooks():
    cfg = config(scheduler={"name": "interval", "params": {"start": 1000}})
    model = make(cfg)()
    ctl = AdaptationController(model, cfg, torch.optim.Adam(model.parameters()), stats_every=1)
    assert [t.name for t in ctl.banks] == ["a.bank", "b.attention.bank"]
    for step in range(3):
        loss_fn(model, step).backward()
        ctl.after_backward(step)
    for i in range(len(ctl.banks)):
        s = ctl.window_stats(i)
        assert s.steps == 3
        assert torch.allclose(s.mass.sum(-1), torch.ones(2), atol=1e-4)  # hooks saw every forward
        assert (s.grad_norm > 0).any()
    with torch.no_grad():  # no statistics outside training
        model(torch.randn(1, 4, 8))
    assert all(not t.stats.pending for t in ctl.banks)
    m = ctl.metrics()
    assert {"adapt/alive", "adapt/births_last", "adapt/deaths_total", "adapt/mass_entropy", "adapt/coverage"} <= set(m)


def test_stats_every_observes_every_nth_step_and_keeps_window_length_in_steps():
    cfg = config(scheduler={"name": "interval", "params": {"start": 1000}})  # window 4 steps
    model = make(cfg)()
    ctl = AdaptationController(model, cfg, torch.optim.Adam(model.parameters()), stats_every=2)
    assert ctl.banks[0].stats.window == 2
    for step in range(7):
        loss_fn(model, step).backward()
        ctl.after_backward(step)
    assert ctl.banks[0].stats.steps == 4  # steps 0, 2, 4, 6


def test_collect_next_step_observes_a_step_stats_every_would_skip():
    cfg = config(scheduler={"name": "interval", "params": {"start": 1000}})
    model = make(cfg)()
    ctl = AdaptationController(model, cfg, torch.optim.Adam(model.parameters()), stats_every=4)
    for step in range(2):  # step 0 observed, step 1 skipped
        loss_fn(model, step).backward()
        ctl.after_backward(step)
    assert ctl.banks[0].stats.steps == 1
    ctl.collect_next_step()
    loss_fn(model, 2).backward()
    ctl.after_backward(2)
    assert ctl.banks[0].stats.steps == 2

def test_grace_protects_newborns():
    cfg = config(birth="relocate", death={"name": "low-mass", "params": {"relative_threshold": 100.0}},
                 scheduler={"name": "interval", "params": {"start": 1, "every": 1}}, min_alive=1)
    model = make(cfg)()
    opt = torch.optim.Adam(model.parameters())
    ctl = AdaptationController(model, cfg, opt, grace_steps=3)
    born_at = {}
    for step in range(1, 7):
        loss_fn(model, step).backward()
        ctl.after_backward(step)
        opt.step()
        report = ctl.step(step)
        opt.zero_grad()
        for r in report.records:
            born_at.setdefault(r.bank, []).append((step, r.births, r.deaths))
    for t in ctl.banks:
        written = t.written_at
        age = 6 - written
        assert (t.bank.alive[(age < 3) & (written >= 0)]).all()


def test_bad_births_are_refused():
    class Bad:
        def propose(self, bank, stats, *, generator):
            return Births(heads=torch.tensor([0]), slots=torch.tensor([0]), centers=torch.zeros(1, bank.head_dim),
                          log_amplitude=torch.zeros(1), shape=bank.shape_params()[0, :1].detach().clone(),
                          sources=torch.tensor([-1]), source_log_amplitude=torch.zeros(1))

    cfg = config(death={"name": "amplitude-floor", "params": {"min_log_amplitude": -100.0}})
    model = make(cfg)()
    ctl = AdaptationController(model, cfg)
    ctl.birth = Bad()
    with pytest.raises(AdaptationError, match="alive slot"):
        ctl.refine(0)


def test_seed_decides_and_state_roundtrips():
    def run(seed):
        cfg = config(seed=seed, death={"name": "low-mass", "params": {"relative_threshold": 0.8}})
        model = make(cfg)()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        ctl = AdaptationController(model, cfg, opt)
        for step in range(5):
            loss_fn(model, step).backward()
            ctl.after_backward(step)
            opt.step()
            ctl.step(step)
            opt.zero_grad()
        return model, ctl

    a, ctl_a = run(0)
    b, _ = run(1)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    state = ctl_a.state_dict()
    cfg = config(death={"name": "low-mass", "params": {"relative_threshold": 0.8}})
    fresh = AdaptationController(make(cfg)(), cfg)
    fresh.load_state_dict(state)
    assert fresh.refines == ctl_a.refines and len(fresh.history) == len(ctl_a.history)
    assert all(torch.equal(x.stats.mass.data, y.stats.mass.data) for x, y in zip(fresh.banks, ctl_a.banks, strict=True))


def test_shift_triggers_refines_and_restarts_statistics():
    cfg = config(birth="relocate", scheduler={"name": "shift", "params": {
        "threshold": 0.25, "window": 5, "delay": 3, "burst": 2, "burst_every": 4}}, splats=6)
    torch.manual_seed(0)
    layer = GSAAttention(2, 4, cfg)
    stream = ClusteredStream(n_heads=2, head_dim=4, n_clusters=4, shift_at=30, seed=0)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    ctl = AdaptationController(layer, cfg, opt, stats_every=1)
    refines = []
    for step in range(60):
        q, k, _ = stream.sample(step, 2, 16)
        (layer(q, k, k) - k).square().mean().backward()
        ctl.after_backward(step)
        opt.step()
        report = ctl.step(step)
        opt.zero_grad()
        if report is not None:
            refines.append((step, report.reason))
    assert len(ctl.shift_events) == 1 and 30 <= ctl.shift_events[0] <= 40
    shift = ctl.shift_events[0]
    assert refines == [(shift + 3, "shift"), (shift + 7, "shift")]
    assert ctl.report()["shift_events"] == ctl.shift_events
