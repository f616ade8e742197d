"""Schedulers: when the adaptation controller refines the banks."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import Field, model_validator

from gsa_core.registry import StrategyParams


class _Window(StrategyParams):
    """A refine window ``[start, stop)`` shared by the step-based schedulers."""

    start: int = Field(100, ge=0)
    stop: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> _Window:
        if self.stop is not None and self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) must not be before start ({self.start})")
        return self

    def in_window(self, step: int) -> bool:
        return self.start <= step and (self.stop is None or step < self.stop)


class IntervalScheduler(_Window):
    """Refine every ``every`` steps from ``start`` (inclusive) until ``stop`` (exclusive)."""

    every: int = Field(100, ge=1)

    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool:
        if not self.in_window(step):
            return False
        return (step - self.start) % self.every == 0


class DecayingScheduler(_Window):
    """Refine often early and ever more rarely: the gaps between refines grow by ``growth``.

    Refines at ``start``, ``start + every``, then each gap is ``growth`` times the previous one (rounded,
    at most ``max_every``), until ``stop`` (exclusive).
    """

    every: int = Field(50, ge=1, description="the first gap")
    growth: float = Field(1.5, ge=1.0, description="each gap is this many times the previous one (< 1.001: constant)")
    max_every: int | None = Field(None, ge=1, description="cap on the gap")

    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool:
        if not self.in_window(step):
            return False
        if self.growth < 1.001:
            return (step - self.start) % self.every == 0
        at, gap = self.start, float(self.every)
        while at < step:
            width = max(1, round(gap))
            if self.max_every is not None:
                width = min(width, self.max_every)
            if self.max_every is not None and width == self.max_every:
                return (step - at) % width == 0  # constant gaps from here on
            at += width
            gap *= self.growth
        return at == step


class ShiftScheduler(_Window):
    """Refine when the distribution of queries/keys shifts (plus, optionally, every ``every`` steps).

    The controller runs a :class:`gsa_core.adaptation.shift.ShiftDetector` built from these params
    (``window``, ``threshold``) and passes its result as signals: ``shift`` (the test statistic),
    ``steps_since_shift`` (steps since the detector last fired; absent before) and
    ``steps_since_refine``. A detected shift makes the controller restart the slot statistics; the
    scheduler then refines ``delay`` steps later (once fresh statistics exist), and again every
    ``burst_every`` steps ``burst`` times in all. ``every`` adds plain interval refines from ``start``.
    """

    start: int = Field(0, ge=0)
    threshold: float = Field(0.25, gt=0, description="symmetric KL per dimension that counts as a shift")
    window: int = Field(20, ge=1, description="steps in each of the detector's two windows")
    check_every: int = Field(1, ge=1, description="run the test every this many steps")
    delay: int = Field(10, ge=0, description="refine this many steps after the shift was detected")
    burst: int = Field(3, ge=1, description="refines per detected shift")
    burst_every: int = Field(10, ge=1, description="steps between the refines of one burst")
    every: int | None = Field(None, ge=1, description="also refine every this many steps (None: only on shifts)")

    def detector_params(self) -> dict[str, float]:
        """What the controller needs to build the detector."""
        return {"window": self.window, "threshold": self.threshold, "check_every": self.check_every}

    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool:
        if not self.in_window(step):
            return False
        if self.every is not None and (step - self.start) % self.every == 0:
            return True
        since = (signals or {}).get("steps_since_shift")
        if since is None or not math.isfinite(since) or since < self.delay:
            return False
        offset = int(since) - self.delay
        return offset == since - self.delay and offset % self.burst_every == 0 and \
            offset // self.burst_every < self.burst
