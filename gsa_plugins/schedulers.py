"""Schedulers: when the adaptation controller refines the banks."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field, model_validator

from gsa_core.registry import StrategyParams


class IntervalScheduler(StrategyParams):
    """Refine every ``every`` steps from ``start`` (inclusive) until ``stop`` (exclusive)."""

    start: int = Field(100, ge=0)
    every: int = Field(100, ge=1)
    stop: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> IntervalScheduler:
        if self.stop is not None and self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) must not be before start ({self.start})")
        return self

    def should_refine(self, step: int, signals: Mapping[str, float] | None = None) -> bool:
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        return (step - self.start) % self.every == 0
