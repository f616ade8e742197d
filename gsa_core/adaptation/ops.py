"""In-place slot edits: births, deaths and the optimizer state of the slots they touch.

Everything keeps shapes fixed (DESIGN.md section 3): a birth writes a dead slot, a death clears an
``alive`` bit, and the optimizer's per-parameter state is edited at the same ``[H, K]`` positions.

Adam and per-slot steps. ``torch.optim.Adam`` keeps one scalar ``step`` per parameter tensor, so a slot
reborn at step ``t`` with zeroed moments would take its first update with the bias corrections of step
``t`` (≈ 1), i.e. ``lr·(1−β1)/sqrt(1−β2) ≈ 3.16·lr`` per coordinate with the default betas.
:class:`AdamSlotSteps` keeps a per-slot step count instead: it records the parameter's step when a slot
is written and, around every ``optimizer.step()`` (optimizer step hooks, no change to the training
loop), replaces the update of young slots by the one Adam would have made with the slot's own step
count ``n``: ``−lr·m/(1−β1ⁿ) / (sqrt(v/(1−β2ⁿ)) + eps)`` (plus decoupled weight decay for AdamW). The
first update of a reborn slot is then ``lr·g/(|g|+eps) ≤ lr`` per coordinate, exactly as for a fresh
parameter. Slots are tracked until their corrections agree with the parameter's to ``tolerance``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.protocols import Births

#: Optimizer state tensors that are per-element moments of their parameter (zeroed on a slot write).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
               "sum", "ax", "prev", "mu_product_prev")


@dataclass
class SplitBirths(Births):
    """:class:`Births` that also rewrite their sources' center and covariance (a split moves the parent).

    ``source_centers [n, d]`` / ``source_shape [n, ...]``: the new center and covariance row of row
    ``i``'s source (ignored where ``sources[i] == -1``). A source that is rewritten appears in one row only.
    """

    source_centers: Tensor | None = None
    source_shape: Tensor | None = None


def _shape_key(bank: SplatBank) -> str:
    return "scale_tril_raw" if bank.covariance == "full" else "log_scale"


@torch.no_grad()
def apply_births(bank: SplatBank, births: Births) -> Tensor:
    """Write ``births`` into ``bank``: first the sources' new values, then the targets.

    Returns ``written [H, K]``: every slot whose values changed (targets and sources), i.e. the slots
    whose optimizer moments must be zeroed.
    """
    written = torch.zeros_like(bank.alive)
    if len(births) == 0:
        return written
    dev = bank.alive.device
    heads, slots, sources = births.heads.long().to(dev), births.slots.long().to(dev), births.sources.long().to(dev)
    has_source = sources >= 0
    if has_source.any():
        h, s = heads[has_source], sources[has_source]
        bank.log_amplitude[h, s] = births.source_log_amplitude.to(dev)[has_source].to(bank.log_amplitude)
        centers = getattr(births, "source_centers", None)
        shape = getattr(births, "source_shape", None)
        if centers is not None:
            bank.centers[h, s] = centers.to(dev)[has_source].to(bank.centers)
        if shape is not None:
            target = bank.shape_params()
            target[h, s] = shape.to(dev)[has_source].to(target)
        written[h, s] = True
    bank.write_slots(heads, slots, centers=births.centers.to(dev), log_amplitude=births.log_amplitude.to(dev),
                     **{_shape_key(bank): births.shape.to(dev)})
    written[heads, slots] = True
    return written


@torch.no_grad()
def limit_deaths(alive: Tensor, dead: Tensor, min_alive: int, priority: Tensor | None = None) -> Tensor:
    """``dead`` reduced so that every head keeps ``min(min_alive, alive in that head)`` alive slots.

    ``priority [H, K]``: slots with the *larger* priority are spared first (e.g. the window's mass);
    ties are broken by slot index, so the result is deterministic.
    """
    dead = dead & alive
    keep_n = alive.sum(-1).clamp(max=min_alive)
    survivors = (alive & ~dead).sum(-1)
    short = (keep_n - survivors).clamp_min(0)
    if not bool((short > 0).any()):
        return dead
    prio = None if priority is None else priority.detach().to("cpu", torch.float64).nan_to_num(nan=-math.inf)
    spared = torch.zeros_like(dead)
    for head in torch.nonzero(short > 0).flatten().tolist():
        doomed = torch.nonzero(dead[head]).flatten().tolist()
        doomed.sort(key=lambda s: (-(float(prio[head, s]) if prio is not None else 0.0), s))
        spared[head, doomed[: int(short[head])]] = True
    return dead & ~spared


# ----------------------------------------------------------------------------- optimizer state
def _param_slots(bank: SplatBank) -> dict[str, Tensor]:
    return bank.slot_parameters()


@torch.no_grad()
def zero_slot_state(optimizers: Iterable[torch.optim.Optimizer], bank: SplatBank, written: Tensor) -> int:
    """Zero every per-element optimizer moment of ``bank``'s parameters at the slots ``written [H, K]``.

    Returns how many state tensors were edited. Parameters the optimizer holds no state for yet are
    skipped (their moments are zero anyway).
    """
    if not bool(written.any()):
        return 0
    edited = 0
    params = list(_param_slots(bank).values())
    for opt in optimizers:
        for p in params:
            state = opt.state.get(p)
            if not state:
                continue
            mask = written.to(p.device)
            for key in MOMENT_KEYS:
                t = state.get(key)
                if isinstance(t, Tensor) and t.shape == p.shape:
                    t[mask] = 0
                    edited += 1
    return edited


def _is_adam(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, torch.optim.Adam | torch.optim.AdamW)


def _decoupled(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    return bool(group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))


class AdamSlotSteps:
    """Per-slot Adam step counts for the splat parameters of some banks (see the module docstring).

    Installs a step pre-hook (snapshot of the young slots' values) and a post-hook (exact per-slot
    update) on an Adam/AdamW optimizer. ``mark(bank, written)`` after writing slots; ``remove()`` to
    uninstall. Other optimizers: moments are still zeroed by :func:`zero_slot_state`, but no per-slot
    step correction is made (a warning says so once).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, banks: Iterable[SplatBank], *, tolerance: float = 1e-3):
        self.optimizer = optimizer
        self.tolerance = tolerance
        self.banks = list(banks)
        self.enabled = _is_adam(optimizer)
        self._born: dict[int, Tensor] = {}  # id(param) -> [H, K] float64: the param's step at the slot's write
        self._young: dict[int, Tensor] = {}  # id(param) -> [H, K] bool
        self._before: dict[int, Tensor] = {}
        # Parameters only: the group (lr, betas) is looked up at each step, because
        # ``optimizer.load_state_dict`` (resume) replaces the group dicts.
        self._params: dict[int, Tensor] = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        self._handles = []
        if self.enabled:
            self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        else:
            warnings.warn(
                f"adaptation: {type(optimizer).__name__} is not Adam/AdamW; reborn slots get zeroed moments "
                "but no per-slot step correction", UserWarning, stacklevel=2)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    def _step_of(self, p: Tensor) -> float:
        state = self.optimizer.state.get(p)
        if not state or "step" not in state:
            return 0.0
        step = state["step"]
        return float(step.item() if isinstance(step, Tensor) else step)

    @torch.no_grad()
    def mark(self, bank: SplatBank, written: Tensor) -> None:
        """The slots ``written [H, K]`` start counting Adam steps from now."""
        if not self.enabled or not bool(written.any()):
            return
        for p in _param_slots(bank).values():
            if id(p) not in self._params:
                continue
            step = self._step_of(p)
            key = id(p)
            born = self._born.get(key)
            if born is None:
                born = torch.zeros(written.shape, dtype=torch.float64, device=p.device)
                self._young[key] = torch.zeros(written.shape, dtype=torch.bool, device=p.device)
            mask = written.to(p.device)
            self._born[key] = torch.where(mask, torch.full_like(born, step), born)
            if step > 0:  # a write before the first step needs no correction: all counts agree
                self._young[key] = self._young[key] | mask

    def young(self, bank: SplatBank) -> Tensor:
        """Slots currently stepped with their own count, ``[H, K]`` (union over the bank's parameters)."""
        out = torch.zeros_like(bank.alive)
        for p in _param_slots(bank).values():
            y = self._young.get(id(p))
            if y is not None:
                out |= y.to(out.device)
        return out

    def slot_steps(self, p: Tensor) -> Tensor | None:
        """Each slot's own step count for parameter ``p`` (``[H, K]``), or None when untracked."""
        born = self._born.get(id(p))
        return None if born is None else self._step_of(p) - born

    @torch.no_grad()
    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before.clear()
        for key, young in self._young.items():
            if bool(young.any()):
                self._before[key] = self._params[key].detach().clone()

    @torch.no_grad()
    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for key, before in self._before.items():
            p = self._params[key]
            group = self._group_of(p)
            state = optimizer.state.get(p)
            if not state or p.grad is None:
                continue
            young = self._young[key]
            t = self._step_of(p)
            n = (t - self._born[key]).clamp_min(1.0)  # [H, K] steps taken since the write
            beta1, beta2 = group["betas"]
            beta1, beta2 = float(beta1), float(beta2)
            lr = float(group["lr"])
            eps = float(group["eps"])
            wd = float(group.get("weight_decay", 0.0))
            bc1 = 1.0 - beta1 ** n
            bc2 = 1.0 - beta2 ** n
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            m = state["exp_avg"]
            extra = p.dim() - 2
            view = (*young.shape, *([1] * extra))
            bc1v, bc2v = bc1.view(view).to(p.dtype), bc2.view(view).to(p.dtype)
            base = before * (1.0 - lr * wd) if (wd and _decoupled(optimizer, group)) else before
            update = (lr / bc1v) * m / ((v.sqrt() / bc2v.sqrt()) + eps)
            corrected = base - update
            mask = young.view(view).expand_as(p)
            p.copy_(torch.where(mask, corrected, p))
            # retire slots whose corrections now match the parameter's own to within tolerance
            g1, g2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
            ratio = (math.sqrt(g2) / g1) / (bc2.sqrt() / bc1)
            self._young[key] = young & ((ratio - 1.0).abs() > self.tolerance)
        self._before.clear()

    def state_dict(self) -> dict[str, Any]:
        names = {}
        for b_i, bank in enumerate(self.banks):
            for name, p in _param_slots(bank).items():
                if id(p) in self._born:
                    names[f"{b_i}.{name}"] = {"born": self._born[id(p)].clone(), "young": self._young[id(p)].clone()}
        return names

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for b_i, bank in enumerate(self.banks):
            for name, p in _param_slots(bank).items():
                entry = state.get(f"{b_i}.{name}")
                if entry is not None:
                    self._born[id(p)] = entry["born"].to(p.device).clone()
                    self._young[id(p)] = entry["young"].to(p.device).clone()


__all__ = ["MOMENT_KEYS", "AdamSlotSteps", "SplitBirths", "apply_births", "limit_deaths", "zero_slot_state"]
