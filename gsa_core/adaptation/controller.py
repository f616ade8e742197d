"""The adaptation controller: scheduler → death → birth on every splat bank of a model.

Where to call what in a training loop::

    controller = AdaptationController(model, gsa_config, optimizer)
    for step, batch in enumerate(loader):
        loss = compute_loss(model, batch)
        loss.backward()                   # (with AMP: scaler.unscale_(optimizer) first)
        controller.after_backward(step)   # 1. statistics: mass, ||dL/dmu||, hits, coverage, shift test data
        optimizer.step()                  # 2. Adam's per-slot step correction runs inside (optimizer hooks)
        controller.step(step)             # 3. maybe refine: scheduler → death → birth, in place
        optimizer.zero_grad()

- ``after_backward`` must run after the last backward of the step (gradient accumulation: once, after
  the last micro-batch) and before ``zero_grad``; it reads ``bank.centers.grad`` and the queries/keys
  that forward hooks on every :class:`~gsa_core.attention.GSAAttention` captured (references only; the
  statistics are computed here, under ``no_grad``, on at most ``stats_max_tokens`` queries, every
  ``stats_every``-th step (default 4, which keeps the overhead within 10% of a step even for a bare
  attention layer; windows keep their length in steps and hold ``window / stats_every`` observations).
- ``step`` must run after ``optimizer.step()``, so written slots are not then moved by stale moments.
  It asks the scheduler (with the shift detector's signals), kills what the death policy chose
  (never below ``bank.min_alive`` alive slots per head, never a slot written less than
  ``grace_steps`` ago), lets the birth policy write dead slots, zeroes the optimizer moments of every
  written slot (sources and targets) and gives them their own Adam step count.

Fixed capacity: shapes never change. Deterministic: the birth generator is seeded from the config's
seed, the refine index and the bank index. Under ``torch.distributed`` the statistics are reduced
across ranks before every decision (:mod:`gsa_core.adaptation.distributed`), so all ranks decide alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gsa_core.adaptation.distributed import Synchronizer, decision_seed
from gsa_core.adaptation.metrics import RefineRecord, bank_metrics, summarise_records
from gsa_core.adaptation.ops import AdamSlotSteps, apply_births, limit_deaths, zero_slot_state
from gsa_core.adaptation.shift import ShiftDetector
from gsa_core.adaptation.statistics import DEFAULT_COVERAGE_RADIUS, SlotStatistics, WindowStats
from gsa_core.bank import SplatBank
from gsa_core.config import AdaptationConfig, GSAConfig
from gsa_core.masks import MaskSpec
from gsa_core.protocols import Births
from gsa_core.registry import Registry


class AdaptationError(RuntimeError):
    """A policy broke its contract (e.g. a birth into an alive slot)."""


@dataclass
class _Tracked:
    name: str
    bank: SplatBank
    stats: SlotStatistics
    detector: ShiftDetector | None
    written_at: Tensor  # [H, K] step of the last write (very negative: never)
    hooks: list[Any] = field(default_factory=list)


@dataclass
class RefineReport:
    """What one call of :meth:`AdaptationController.refine` did."""

    step: int
    reason: str
    records: list[RefineRecord]

    @property
    def births(self) -> int:
        return sum(r.births for r in self.records)

    @property
    def deaths(self) -> int:
        return sum(r.deaths for r in self.records)


def find_banks(model: nn.Module) -> list[tuple[str, SplatBank]]:
    """Every :class:`SplatBank` in ``model`` with its qualified name (each bank once)."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, SplatBank) and id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def _owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    """Modules with a ``forward(q, k, v, mask)`` that own a bank (GSAAttention), by ``id(bank)``."""
    from gsa_core.attention import GSAAttention

    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, GSAAttention):
            owners.setdefault(id(module.bank), []).append(module)
    return owners


class AdaptationController:
    """Birth and death of splats during training for every bank of ``model`` (see the module docstring).

    ``config``: a :class:`GSAConfig` (its ``adaptation`` section, ``bank.min_alive`` and ``seed``) or an
    :class:`AdaptationConfig`. With ``adaptation.enabled`` False the controller records nothing and never
    refines (its calls are cheap no-ops) unless ``force=True``.

    Keyword arguments: ``min_alive`` / ``seed`` override the config's; ``grace_steps``: a slot written
    less than this many steps ago cannot die; ``stats_max_tokens``: query tokens per step used for the
    mass statistics (whole sequences first, so causal normalisers stay exact); ``stats_every``: observe
    every n-th step only (windows keep their length in steps, so they hold ``window / n``
    observations); ``coverage_radius``: the coverage test's radius in stds; ``gap_points``: coverage-gap
    candidates kept per step and head; ``reset_stats_on_shift``: restart the window when the shift
    detector fires; ``process_group`` / ``synchronize``: the ``torch.distributed`` group whose ranks must
    decide alike (default: the default group when initialised; ``synchronize=False`` turns the
    reductions off, so each rank decides on its own statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        config: GSAConfig | AdaptationConfig,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        min_alive: int | None = None,
        seed: int | None = None,
        grace_steps: int = 10,
        stats_max_tokens: int = 512,
        stats_every: int = 4,
        coverage_radius: float = DEFAULT_COVERAGE_RADIUS,
        gap_points: int = 16,
        reset_stats_on_shift: bool = True,
        process_group: Any = None,
        synchronize: bool | None = None,
        registry: Registry | None = None,
        force: bool = False,
    ) -> None:
        if isinstance(config, GSAConfig):
            adaptation = config.adaptation
            min_alive = config.bank.min_alive if min_alive is None else min_alive
            seed = config.seed if seed is None else seed
        elif isinstance(config, AdaptationConfig):
            adaptation = config
        else:
            raise TypeError(f"config must be a GSAConfig or AdaptationConfig, got {type(config).__name__}")
        self.config = adaptation
        self.enabled = bool(adaptation.enabled or force)
        self.min_alive = 1 if min_alive is None else int(min_alive)
        self.seed = 0 if seed is None else int(seed)
        self.grace_steps = grace_steps
        if stats_every < 1:
            raise ValueError(f"stats_every must be >= 1, got {stats_every}")
        self.stats_every = stats_every
        self._collecting = True
        self.reset_stats_on_shift = reset_stats_on_shift
        self.sync = Synchronizer(process_group, enabled=synchronize)
        self.scheduler = adaptation.scheduler.build(registry)
        self.death = adaptation.death.build(registry)
        self.birth = adaptation.birth.build(registry)
        detector_params = getattr(self.scheduler, "detector_params", None)
        self._detector_params: dict[str, Any] | None = dict(detector_params()) if callable(detector_params) else None
        self.banks: list[_Tracked] = []
        owners = _owners(model)
        for name, bank in find_banks(model):
            # windows are given in training steps; with stats_every > 1 they hold fewer observations
            stats = SlotStatistics(bank, max(1, -(-adaptation.window // stats_every)), max_tokens=stats_max_tokens,
                                   gap_points=gap_points, coverage_radius=coverage_radius, max_calls=8)
            detector = None
            if self._detector_params is not None:
                window = max(1, -(-int(self._detector_params["window"]) // stats_every))
                detector = ShiftDetector(bank.n_heads, bank.head_dim, window,
                                         threshold=float(self._detector_params["threshold"]))
                detector.to(bank.alive.device)
            written_at = torch.full(bank.alive.shape, -(2**62), dtype=torch.long)
            tracked = _Tracked(name, bank, stats, detector, written_at)
            if self.enabled:
                for module in owners.get(id(bank), []):
                    tracked.hooks.append(module.register_forward_pre_hook(self._make_hook(tracked), with_kwargs=True))
            self.banks.append(tracked)
        if not self.banks:
            warnings.warn("AdaptationController: the model holds no SplatBank; nothing to adapt", UserWarning,
                          stacklevel=2)
        unobserved = [t.name for t in self.banks if id(t.bank) not in owners]
        if unobserved and self.enabled:
            warnings.warn(
                f"AdaptationController: bank(s) {unobserved} belong to no GSAAttention module, so their queries "
                "and keys are not captured automatically; call controller.observe(bank, q, k, mask) from the "
                "module that runs them (gradient statistics work regardless)", UserWarning, stacklevel=2)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.slot_steps: list[AdamSlotSteps] = []
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        self.history: list[RefineRecord] = []
        self.refines = 0
        self.last_refine_step: int | None = None
        self.last_shift_step: int | None = None
        self.shift_score = 0.0
        self.shift_events: list[int] = []

    # ----------------------------------------------------------------- wiring
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Edit this optimizer's state on every slot write (and give Adam per-slot step counts)."""
        if any(o is optimizer for o in self.optimizers):
            return
        self.optimizers.append(optimizer)
        if self.enabled:
            self.slot_steps.append(AdamSlotSteps(optimizer, [t.bank for t in self.banks]))

    def remove_hooks(self) -> None:
        """Detach every forward hook and optimizer hook this controller installed."""
        for t in self.banks:
            for h in t.hooks:
                h.remove()
            t.hooks.clear()
        for s in self.slot_steps:
            s.remove()

    def _make_hook(self, tracked: _Tracked):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not (self.enabled and self._collecting and module.training and torch.is_grad_enabled()):
                return
            q = args[0] if len(args) > 0 else kwargs.get("q")
            k = args[1] if len(args) > 1 else kwargs.get("k")
            mask = args[3] if len(args) > 3 else kwargs.get("mask")
            if isinstance(q, Tensor) and isinstance(k, Tensor):
                tracked.stats.observe(q, k, mask if isinstance(mask, MaskSpec) else None)
        return hook

    def observe(self, bank: SplatBank, q: Tensor, k: Tensor, mask: MaskSpec | None = None) -> None:
        """Hand one forward's queries/keys ``[B, H, n, d]`` of ``bank`` to the statistics (for modules the
        controller does not hook itself)."""
        for t in self.banks:
            if t.bank is bank:
                t.stats.observe(q, k, mask)
                return
        raise KeyError("observe(): this bank is not tracked by the controller")

    # ----------------------------------------------------------------- the training-loop calls
    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Accumulate this step's statistics (call after backward, before ``optimizer.step()``)."""
        if not self.enabled:
            return
        if self._collecting:
            for t in self.banks:
                if t.detector is not None:
                    for obs in t.stats.pending:
                        t.detector.observe(obs.q, obs.k)
                    t.detector.end_step()
                t.stats.accumulate()
        self._collecting = (step + 1) % self.stats_every == 0

    def collect_next_step(self) -> None:
        """Observe the next training step whatever ``stats_every`` says (after changing it mid-run, say)."""
        self._collecting = True

    def signals(self, step: int) -> dict[str, float]:
        """What the scheduler sees: the shift statistic and step counters."""
        out: dict[str, float] = {"shift": self.shift_score}
        if self.last_shift_step is not None:
            out["steps_since_shift"] = float(step - self.last_shift_step)
        if self.last_refine_step is not None:
            out["steps_since_refine"] = float(step - self.last_refine_step)
        return out

    def _check_shift(self, step: int) -> None:
        params = self._detector_params
        if params is None or step % max(1, int(params.get("check_every", 1))) != 0:
            return
        scores = [t.detector.score(self.sync.all_reduce_sum) for t in self.banks if t.detector is not None]
        self.shift_score = max(scores) if scores else 0.0
        if self.shift_score >= float(params["threshold"]):
            self.last_shift_step = step
            self.shift_events.append(step)
            for t in self.banks:
                if t.detector is not None:
                    t.detector.reset()
                if self.reset_stats_on_shift:
                    t.stats.reset()

    def step(self, step: int) -> RefineReport | None:
        """Refine if the scheduler says so (call after ``optimizer.step()``); returns what was done."""
        if not self.enabled:
            return None
        self._check_shift(step)
        if not self.scheduler.should_refine(step, self.signals(step)):
            return None
        on_schedule = self.scheduler.should_refine(step, {"shift": 0.0})
        return self.refine(step, reason="schedule" if on_schedule else "shift")

    # ----------------------------------------------------------------- refine
    def window_stats(self, index: int) -> WindowStats:
        """Bank ``index``'s window statistics, reduced across ranks (what the policies read)."""
        t = self.banks[index]
        sums = self.sync.all_reduce_dict_mean(t.stats.window_sums())
        points, dist = t.stats.gap_candidates(fixed=True)
        if self.sync.active:
            points, dist = self.sync.all_gather_cat(points, 1), self.sync.all_gather_cat(dist, 1)
        return t.stats.stats(sums=sums, gaps=(points, dist))

    @torch.no_grad()
    def refine(self, step: int, reason: str = "manual") -> RefineReport:
        """Run death then birth on every bank now."""
        records = []
        for index, t in enumerate(self.banks):
            bank = t.bank
            stats = self.window_stats(index)
            alive_before = bank.alive.clone()
            # ---- death
            dead = self.death.select(bank, stats).to(bank.alive.device).bool() & bank.alive
            if self.grace_steps > 0:
                young = (step - t.written_at.to(dead.device)) < self.grace_steps
                dead &= ~young
            dead = limit_deaths(bank.alive, dead, self.min_alive, priority=stats.mass)
            if bool(dead.any()):
                bank.kill_slots(dead)
                zero_slot_state(self.optimizers, bank, dead)
            # ---- birth
            generator = torch.Generator().manual_seed(decision_seed(self.seed, self.refines, index))
            births = self.birth.propose(bank, stats, generator=generator)
            self._check_births(bank, births)
            written = apply_births(bank, births)
            if bool(written.any()):
                zero_slot_state(self.optimizers, bank, written)
                for s in self.slot_steps:
                    s.mark(bank, written)
                t.stats.forget(written)
                t.written_at = torch.where(written.cpu(), torch.full_like(t.written_at, step), t.written_at)
            born = torch.zeros_like(alive_before)
            if len(births):
                born[births.heads.long().to(born.device), births.slots.long().to(born.device)] = True
            records.append(RefineRecord(
                step=step, bank=t.name, births=int(born.sum()), deaths=int(dead.sum()), alive=int(bank.alive.sum()),
                births_per_head=[int(v) for v in born.sum(-1)], deaths_per_head=[int(v) for v in dead.sum(-1)],
                alive_per_head=[int(v) for v in bank.alive.sum(-1)], reason=reason,
            ))
        self.history.extend(records)
        self.refines += 1
        self.last_refine_step = step
        return RefineReport(step=step, reason=reason, records=records)

    def _check_births(self, bank: SplatBank, births: Births) -> None:
        if len(births) == 0:
            return
        who = type(self.birth).__name__
        h, s = births.heads.long().to(bank.alive.device), births.slots.long().to(bank.alive.device)
        if ((h < 0) | (h >= bank.n_heads) | (s < 0) | (s >= bank.capacity)).any():
            raise AdaptationError(f"{who}: birth outside the bank's capacity")
        if bank.alive[h, s].any():
            raise AdaptationError(f"{who}: birth into an alive slot")
        if len(set(zip(h.tolist(), s.tolist(), strict=True))) != len(births):
            raise AdaptationError(f"{who}: two births into the same slot")
        src = births.sources.long().to(bank.alive.device)
        has = src >= 0
        if has.any() and not bank.alive[h[has], src[has]].all():
            raise AdaptationError(f"{who}: a birth copied a dead source")

    # ----------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """Flat ``{"adapt/...": number}`` for a logger: alive, births/deaths at the last refine and in total,
        refines, mass entropy, coverage and the shift statistic."""
        alive = sum(int(t.bank.alive.sum()) for t in self.banks)
        capacity = sum(t.bank.n_heads * t.bank.capacity for t in self.banks)
        last = [r for r in self.history if r.step == self.last_refine_step]
        out: dict[str, float] = {
            "adapt/alive": float(alive),
            "adapt/alive_fraction": alive / max(capacity, 1),
            "adapt/refines": float(self.refines),
            "adapt/births_total": float(sum(r.births for r in self.history)),
            "adapt/deaths_total": float(sum(r.deaths for r in self.history)),
            "adapt/births_last": float(sum(r.births for r in last)),
            "adapt/deaths_last": float(sum(r.deaths for r in last)),
            "adapt/shift": float(self.shift_score),
        }
        entropies, coverages = [], []
        for t in self.banks:
            m = bank_metrics(t.bank, t.stats.stats())
            if "mass_entropy" in m:
                entropies.append(m["mass_entropy"])
            if "coverage" in m:
                coverages.append(m["coverage"])
        if entropies:
            out["adapt/mass_entropy"] = sum(entropies) / len(entropies)
        if coverages:
            out["adapt/coverage"] = sum(coverages) / len(coverages)
        return out

    def report(self) -> dict[str, Any]:
        """Everything for a JSON report or the visualisation: per-bank metrics, refine history, shifts."""
        return {
            "banks": {t.name: bank_metrics(t.bank, t.stats.stats()) for t in self.banks},
            "refines": summarise_records(self.history),
            "history": [r.to_dict() for r in self.history],
            "shift_events": list(self.shift_events),
        }

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "banks": {t.name: {"stats": t.stats.state_dict(), "written_at": t.written_at.clone(),
                               "detector": None if t.detector is None else t.detector.state_dict()}
                      for t in self.banks},
            "slot_steps": [s.state_dict() for s in self.slot_steps],
            "refines": self.refines, "last_refine_step": self.last_refine_step,
            "last_shift_step": self.last_shift_step, "shift_score": self.shift_score,
            "shift_events": list(self.shift_events), "history": [r.to_dict() for r in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for t in self.banks:
            entry = state["banks"].get(t.name)
            if entry is None:
                continue
            t.stats.load_state_dict(entry["stats"])
            t.written_at = entry["written_at"].clone()
            if t.detector is not None and entry["detector"] is not None:
                t.detector.load_state_dict(entry["detector"])
        for s, s_state in zip(self.slot_steps, state.get("slot_steps", []), strict=False):
            s.load_state_dict(s_state)
        self.refines = int(state["refines"])
        self.last_refine_step = state["last_refine_step"]
        self.last_shift_step = state["last_shift_step"]
        self.shift_score = float(state["shift_score"])
        self.shift_events = list(state["shift_events"])
        self.history = [RefineRecord(**r) for r in state["history"]]


def controller_for(model: nn.Module, config: GSAConfig, optimizer: torch.optim.Optimizer | None = None,
                   **kwargs: Any) -> AdaptationController | None:
    """An :class:`AdaptationController` when ``config.adaptation.enabled``, else None."""
    if not config.adaptation.enabled:
        return None
    return AdaptationController(model, config, optimizer, **kwargs)


__all__ = ["AdaptationController", "AdaptationError", "RefineReport", "controller_for", "find_banks"]
