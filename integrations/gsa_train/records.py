"""What a run's history records about adaptation at each logged step, so the timeline of a run
(``gsa viz adaptation``) is drawn from records, never recomputed: alive splats per bank and the shift
detector's statistic. Births and deaths are recorded at the steps they happen, by the controller's refine
history (``train.json`` / ``distill.json``: ``adaptation*.history``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def adaptation_point(model: nn.Module, controller: Any) -> dict[str, Any]:
    """``{"alive": {bank name: alive slots}, "shift": statistic or None}`` (None: the scheduler runs no shift
    detector); ``{}`` when there is no enabled controller."""
    if controller is None or not controller.enabled:
        return {}
    from gsa_core.adaptation.controller import find_banks

    detects = callable(getattr(controller.scheduler, "detector_params", None))
    return {"alive": {name: int(bank.alive.sum()) for name, bank in find_banks(model)},
            "shift": round(float(controller.shift_score), 6) if detects else None}


__all__ = ["adaptation_point"]
