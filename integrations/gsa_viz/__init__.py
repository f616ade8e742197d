"""Pictures of GSA: splats among the queries and keys, GSA against softmax attention, coverage, adaptation over
training, and one self-contained HTML report (``gsa viz ...``, ``gsa report``).

Every picture is also a Python function that returns a matplotlib figure, for notebooks::

    from gsa_viz import load_gsa_model, splat_figure
    viz = load_gsa_model("runs/gsa")
    fig = splat_figure(viz, text, layer=0, head="all")

Figures are drawn on matplotlib's file-only Agg backend, with colour-blind-safe colours (viridis / cividis /
PuOr maps, Okabe-Ito lines). Nothing is imported until used, so ``gsa --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_gsa_model": "gsa_viz.inputs",
    "capture": "gsa_viz.inputs",
    "splat_figure": "gsa_viz.splats",
    "attention_figure": "gsa_viz.attention",
    "coverage_figure": "gsa_viz.coverage",
    "adaptation_figure": "gsa_viz.adaptation",
    "read_run": "gsa_viz.adaptation",
    "build_report": "gsa_viz.report",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gsa_viz' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
