"""Adaptation: birth and death of splats during training (DESIGN.md section 3).

- :mod:`~gsa_core.adaptation.ring_buffer`: fixed-size tensor ring buffers (O(1) push, windowed sums);
- :mod:`~gsa_core.adaptation.statistics`: per-slot mass, ``||dL/dmu||``, hits and coverage per step;
- :mod:`~gsa_core.adaptation.shift`: two-window distribution-shift test on queries and keys;
- :mod:`~gsa_core.adaptation.coverage`: which tokens have a splat near them;
- :mod:`~gsa_core.adaptation.metrics`: alive count, births/deaths per refine, mass entropy, coverage;
- :mod:`~gsa_core.adaptation.ops`: in-place slot writes and optimizer-state surgery (per-slot Adam steps);
- :mod:`~gsa_core.adaptation.distributed`: identical decisions on every rank;
- :mod:`~gsa_core.adaptation.controller`: :class:`AdaptationController`, scheduler → death → birth;
- :mod:`~gsa_core.adaptation.update`: :func:`apply_update`, the one parameter update after backward.

Never imports ``transformers``.
"""

from gsa_core.adaptation.controller import (
    AdaptationController,
    AdaptationError,
    RefineReport,
    controller_for,
    find_banks,
)
from gsa_core.adaptation.coverage import CoverageMap, coverage_map, coverage_report, uncovered_points
from gsa_core.adaptation.distributed import Synchronizer, decision_seed
from gsa_core.adaptation.metrics import RefineRecord, bank_metrics, effective_slots, mass_entropy, summarise_records
from gsa_core.adaptation.ops import AdamSlotSteps, SplitBirths, apply_births, limit_deaths, zero_slot_state
from gsa_core.adaptation.ring_buffer import RingBuffer
from gsa_core.adaptation.shift import ShiftDetector, gaussian_symmetric_kl
from gsa_core.adaptation.statistics import (
    DEFAULT_COVERAGE_RADIUS,
    SlotStatistics,
    WindowStats,
    features_and_distance,
    slot_mass,
    slot_routing,
)
from gsa_core.adaptation.update import UpdateReport, apply_update

__all__ = [
    "DEFAULT_COVERAGE_RADIUS", "AdamSlotSteps", "AdaptationController", "AdaptationError", "CoverageMap",
    "RefineRecord", "RefineReport", "RingBuffer", "ShiftDetector", "SlotStatistics", "SplitBirths",
    "Synchronizer", "UpdateReport", "WindowStats", "apply_births", "apply_update", "bank_metrics",
    "controller_for", "coverage_map",
    "coverage_report", "decision_seed", "effective_slots", "features_and_distance", "find_banks",
    "gaussian_symmetric_kl", "limit_deaths", "mass_entropy", "slot_mass", "slot_routing", "summarise_records",
    "uncovered_points", "zero_slot_state",
]
