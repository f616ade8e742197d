"""The one parameter update every training loop runs after ``loss.backward()``.

The order matters and is the same everywhere (training, both distillation stages, the adaptation
benchmark): gradients are averaged across ranks first, so the controller's gradient statistics and the
clipping see the global gradient; the controller reads its statistics before the optimizer moves the
splats; it refines after the step, so a reborn slot's zeroed Adam moments are not overwritten by that
step; gradients are cleared last. A resumed or data-parallel run therefore takes the same decisions as
an uninterrupted single-process one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gsa_core.adaptation.controller import AdaptationController, RefineReport


@dataclass(frozen=True)
class UpdateReport:
    """What one update did: the gradient norm before clipping (when clipping) and the refine (if any)."""

    grad_norm: float | None
    refine: RefineReport | None


def apply_update(
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    controller: AdaptationController | None = None,
    average_gradients: Callable[[], None] | None = None,
    max_grad_norm: float | None = None,
    parameters: Iterable[Tensor] | None = None,
) -> UpdateReport:
    """Average gradients -> controller after backward -> (clip) -> optimizer step -> controller step -> zero grad.

    ``average_gradients``: the all-reduce of a data-parallel run (called with no arguments; ``None`` in
    one process). ``max_grad_norm``: clip the total gradient norm of ``parameters`` (default: every
    parameter the optimizer holds) to this value; the norm before clipping is returned.
    """
    if average_gradients is not None:
        average_gradients()
    if controller is not None:
        controller.after_backward(step)
    grad_norm = None
    if max_grad_norm:
        params = list(parameters) if parameters is not None else [
            p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    refine = controller.step(step) if controller is not None else None
    optimizer.zero_grad(set_to_none=True)
    return UpdateReport(grad_norm=grad_norm, refine=refine)
