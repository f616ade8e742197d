"""Optimizer surgery: written slots get zeroed moments and their own Adam step count, so a reborn
slot's first update is at most the learning rate per coordinate (not ~3x it)."""

from __future__ import annotations

import pytest
import torch

from gsa_core.adaptation import AdamSlotSteps, AdaptationController, zero_slot_state
from gsa_core.attention import GSAAttention
from gsa_core.bank import SplatBank
from gsa_core.config import GSAConfig

LR = 0.01


def _grads(bank: SplatBank, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in bank.slot_parameters().values():
        p.grad = torch.randn(p.shape, generator=g) * (1.0 + step % 3)


def _train(bank, opt, steps, start=0, jump_to=None):
    for step in range(start, start + steps):
        _grads(bank, step)
        opt.step()
    if jump_to is not None:  # pretend a long run: only the bias corrections depend on the count
        for p in bank.slot_parameters().values():
            opt.state[p]["step"].fill_(float(jump_to))


def _rebirth(bank, opt, slot_steps, written):
    with torch.no_grad():
        for p in bank.slot_parameters().values():
            p[written] = torch.randn_like(p[written])
    zero_slot_state([opt], bank, written)
    if slot_steps is not None:
        slot_steps.mark(bank, written)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=LR),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=LR, amsgrad=True),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize(("covariance", "global_step"), [("diagonal", 40), ("diagonal", 5000), ("full", 5000)])
def test_first_update_of_a_reborn_slot_is_at_most_lr(name, covariance, global_step):
    bank = SplatBank(2, 3, 5, covariance)
    opt = OPTIMIZERS[name](bank.parameters())
    slot_steps = AdamSlotSteps(opt, [bank])
    _train(bank, opt, 40, jump_to=global_step)
    written = torch.zeros(2, 5, dtype=torch.bool)
    written[0, 1] = written[1, 4] = True
    _rebirth(bank, opt, slot_steps, written)
    for p in bank.slot_parameters().values():
        assert (opt.state[p]["exp_avg"][written] == 0).all() and (opt.state[p]["exp_avg_sq"][written] == 0).all()
    before = {k: p.detach().clone() for k, p in bank.slot_parameters().items()}
    _grads(bank, 40)
    opt.step()
    for k, p in bank.slot_parameters().items():
        delta = (p.detach() - before[k])[written]
        # the difference of two float32 values of size |p| is only known to about one ulp of |p|
        ulp = torch.finfo(p.dtype).eps * float(torch.maximum(p.detach().abs(), before[k].abs())[written].max())
        assert delta.abs().max() <= LR * (1 + 1e-5) + 2 * ulp, (k, delta.abs().max())
        assert delta.abs().min() >= LR * 0.99  # exactly lr * g / (|g| + eps), as for a fresh parameter
    slot_steps.remove()


def test_without_the_correction_a_reborn_slot_overshoots():
    bank = SplatBank(1, 3, 4, "diagonal")
    opt = torch.optim.Adam(bank.parameters(), lr=LR)
    _train(bank, opt, 40, jump_to=5000)
    written = torch.zeros(1, 4, dtype=torch.bool)
    written[0, 2] = True
    _rebirth(bank, opt, None, written)
    before = bank.centers.detach().clone()
    _grads(bank, 40)
    opt.step()
    step = (bank.centers.detach() - before)[written].abs()
    assert step.min() > 2.5 * LR  # (1 - b1) / sqrt(1 - b2) = 3.16 x lr: why the correction exists


@pytest.mark.parametrize("name", ["adam", "adamw", "adam-amsgrad"])
def test_reborn_slot_follows_a_fresh_adam_exactly(name):
    make = OPTIMIZERS[name] if name != "adamw" else (lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.05))
    bank = SplatBank(1, 3, 4, "diagonal")
    opt = make(bank.parameters())
    slot_steps = AdamSlotSteps(opt, [bank])
    _train(bank, opt, 25, jump_to=3000)
    written = torch.zeros(1, 4, dtype=torch.bool)
    written[0, 3] = True
    _rebirth(bank, opt, slot_steps, written)
    fresh = torch.nn.Parameter(bank.centers.detach()[0, 3].clone())
    ref = make([fresh])
    for step in range(25, 37):
        _grads(bank, step)
        fresh.grad = bank.centers.grad[0, 3].clone()
        opt.step()
        ref.step()
        assert torch.allclose(bank.centers.detach()[0, 3], fresh.detach(), atol=1e-6, rtol=1e-5), step
    # untouched slots took plain Adam steps: identical to an optimizer that never saw a rebirth
    assert slot_steps.young(bank)[0, 3]


def test_slots_retire_from_correction_once_counts_agree():
    bank = SplatBank(1, 2, 3, "isotropic")
    opt = torch.optim.Adam(bank.parameters(), lr=LR, betas=(0.5, 0.6))
    slot_steps = AdamSlotSteps(opt, [bank], tolerance=1e-3)
    _train(bank, opt, 5)
    written = torch.zeros(1, 3, dtype=torch.bool)
    written[0, 0] = True
    _rebirth(bank, opt, slot_steps, written)
    assert slot_steps.young(bank)[0, 0]
    _train(bank, opt, 40, start=5)
    assert not slot_steps.young(bank).any()  # 0.6 ** 40 is far below the tolerance


def test_controller_zeroes_sources_and_targets_and_bounds_the_first_step():
    cfg = GSAConfig.from_dict({
        "bank": {"n_splats": 8, "min_alive": 2}, "backend": "dense",
        "adaptation": {"enabled": True, "window": 3,
                       "scheduler": {"name": "interval", "params": {"start": 30, "every": 1000}},
                       "death": {"name": "low-mass", "params": {"relative_threshold": 0.9}},
                       "birth": {"name": "relocate", "params": {"jitter": 0.3}}}})
    torch.manual_seed(0)
    layer = GSAAttention(2, 4, cfg)
    opt = torch.optim.Adam(layer.parameters(), lr=LR)
    ctl = AdaptationController(layer, cfg, opt, grace_steps=0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(3))
    report = None
    for step in range(31):
        (layer(q, k, v) - v).square().mean().backward()
        ctl.after_backward(step)
        opt.step()
        before = {n: p.detach().clone() for n, p in layer.bank.slot_parameters().items()}
        report = ctl.step(step) or report
        opt.zero_grad()
    assert report is not None and report.births > 0
    written = torch.zeros_like(layer.bank.alive)
    for n, p in layer.bank.slot_parameters().items():
        diff = p.detach() != before[n]
        written |= diff.reshape(*diff.shape[:2], -1).any(-1)
    births = report.records[0]
    assert int(written.sum()) > births.births  # sources (their amplitude was shared) were written too
    for p in layer.bank.slot_parameters().values():
        assert (opt.state[p]["exp_avg"][written] == 0).all() and (opt.state[p]["exp_avg_sq"][written] == 0).all()
    snap = {n: p.detach().clone() for n, p in layer.bank.slot_parameters().items()}
    (layer(q, k, v) - v).square().mean().backward()
    opt.step()
    for n, p in layer.bank.slot_parameters().items():
        moved = (p.detach() - snap[n])[written & layer.bank.alive]
        assert moved.abs().max() <= LR * (1 + 1e-5), (n, moved.abs().max())
    ctl.remove_hooks()


def test_correction_follows_the_optimizer_after_load_state_dict():
    """Resume reloads the optimizer state (new param-group dicts): the reborn slot still follows a fresh
    Adam at the *reloaded* learning rate."""
    bank = SplatBank(1, 3, 4, "diagonal")
    opt = torch.optim.Adam(bank.parameters(), lr=LR)
    slot_steps = AdamSlotSteps(opt, [bank])
    _train(bank, opt, 25, jump_to=3000)
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = LR / 4
    opt.load_state_dict(saved)
    written = torch.zeros(1, 4, dtype=torch.bool)
    written[0, 3] = True
    _rebirth(bank, opt, slot_steps, written)
    fresh = torch.nn.Parameter(bank.centers.detach()[0, 3].clone())
    ref = torch.optim.Adam([fresh], lr=LR / 4)
    for step in range(25, 33):
        _grads(bank, step)
        fresh.grad = bank.centers.grad[0, 3].clone()
        opt.step()
        ref.step()
        assert torch.allclose(bank.centers.detach()[0, 3], fresh.detach(), atol=1e-6, rtol=1e-5), step
