"""``gsa viz adaptation``: what birth and death did over a ``gsa train`` or ``gsa distill`` run, from its records.

Read, never recomputed: ``train.json`` / ``distill.json`` hold the loss per logged step, and (since the runs
record them, :mod:`gsa_train.records`) alive splats per bank and the shift detector's statistic per logged step;
the controller's refine history holds each refine's births and deaths per bank, and its detected shifts. Older
runs without the per-step fields still show alive splats after each refine.

The x axis is optimizer steps completed (a refine or shift at the loop's step index ``s`` happens after ``s + 1``
steps). A distillation's stage 2 continues the axis after stage 1's steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsa_core.errors import ConfigError
from gsa_viz.figures import DPI, OKABE_ITO, pyplot, set_title

RUN_FILES = ("train.json", "distill.json")
#: ``gid`` of the drawn artists.
GID_ALIVE, GID_BIRTHS, GID_DEATHS, GID_SHIFT, GID_LOSS = "alive", "births", "deaths", "shift", "loss"


@dataclass
class Stage:
    """One training loop's records: ``loss`` ``[(x, value)]``, ``alive`` ``{bank: [(x, n)]}``, ``births`` /
    ``deaths`` ``[(x, count)]`` summed over banks per refine, ``shift`` ``[(x, statistic)]`` (empty: no detector),
    ``shift_events`` ``[x]``, and the detector's ``threshold`` (None without one)."""

    name: str
    loss_label: str
    start: int = 0
    end: int = 0
    loss: list[tuple[int, float]] = field(default_factory=list)
    alive: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    births: list[tuple[int, int]] = field(default_factory=list)
    deaths: list[tuple[int, int]] = field(default_factory=list)
    shift: list[tuple[int, float]] = field(default_factory=list)
    shift_events: list[int] = field(default_factory=list)
    threshold: float | None = None


@dataclass
class Run:
    """A run folder's adaptation records: its file and stages (``gsa distill``: one per stage that adapted)."""

    path: Path
    source: str
    stages: list[Stage]


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f" and {len(names) - 12} more" if len(names) > 12 else ""
    return "it has " + ", ".join(names[:12]) + more


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a run record (a JSON object written by gsa train or gsa distill)")
    return data


def _threshold(gsa: Any) -> float | None:
    try:
        scheduler = gsa["adaptation"]["scheduler"]
    except (KeyError, TypeError):
        return None
    if not isinstance(scheduler, dict) or scheduler.get("name") != "shift":
        return None
    from gsa_core.registry import get_registry

    params = get_registry().build("scheduler", "shift", scheduler.get("params") or {})
    return float(params.threshold)


def _stage(name: str, loss_label: str, loss_key: str, history: list[dict[str, Any]], adaptation: dict[str, Any],
           *, offset: int, step_shift: int, threshold: float | None, steps: int) -> Stage:
    """``step_shift``: added to a history entry's step to make it steps completed (records of refines and
    shifts always take ``+ 1``)."""
    stage = Stage(name, loss_label, start=offset, end=offset + steps, threshold=threshold)
    for entry in history:
        x = offset + int(entry["step"]) + step_shift
        if isinstance(entry.get(loss_key), int | float):
            stage.loss.append((x, float(entry[loss_key])))
        for bank, n in (entry.get("alive") or {}).items():
            stage.alive.setdefault(bank, []).append((x, int(n)))
        if isinstance(entry.get("shift"), int | float):
            stage.shift.append((x, float(entry["shift"])))
    refines: dict[int, list[int]] = {}
    from_refines: dict[str, list[tuple[int, int]]] = {}
    for record in adaptation.get("history") or []:
        x = offset + int(record["step"]) + 1
        born_dead = refines.setdefault(x, [0, 0])
        born_dead[0] += int(record["births"])
        born_dead[1] += int(record["deaths"])
        from_refines.setdefault(record["bank"], []).append((x, int(record["alive"])))
    stage.births = [(x, b) for x, (b, _) in sorted(refines.items())]
    stage.deaths = [(x, d) for x, (_, d) in sorted(refines.items())]
    if not stage.alive:  # a run from before the per-step records: alive after each refine
        stage.alive = from_refines
    stage.shift_events = [offset + int(s) + 1 for s in adaptation.get("shift_events") or []]
    return stage


def read_run(path: str | Path) -> Run:
    """The adaptation records of a run folder (``gsa train --out`` or ``gsa distill --output``); a folder without
    them is a :class:`ConfigError` naming what it holds."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"run folder {folder} does not exist" if not folder.exists() else
                          f"{folder} is a file; give the run's folder (gsa train --out, gsa distill --output)")
    found = [name for name in RUN_FILES if (folder / name).is_file()]
    if not found:
        raise ConfigError(f"{folder} holds no run records (train.json from gsa train, distill.json from gsa distill); "
                          f"{_listing(folder)}")
    source = found[0]
    data = _load(folder / source)
    if source == "train.json":
        adaptation = data.get("adaptation")
        if not isinstance(adaptation, dict):
            attention = (data.get("settings") or {}).get("attention", "unknown")
            raise ConfigError(f"{folder / source} records no adaptation: the run's attention is {attention!r}"
                              + (" with adaptation off" if attention == "gsa" else "")
                              + "; train with GSA and adaptation enabled to see births and deaths")
        steps = int((data.get("final") or {}).get("step") or 0)
        stages = [_stage("training", "training loss (nats/token)", "loss", data.get("history") or [], adaptation,
                         offset=0, step_shift=0, threshold=_threshold(data.get("gsa_config")), steps=steps)]
    else:
        threshold = _threshold((data.get("settings") or {}).get("gsa"))
        stages, offset = [], 0
        for n, key, label in ((1, "rel_mse", "stage 1: attention-output relative MSE"),
                              (2, "loss", "stage 2: task loss")):
            record, adaptation = data.get(f"stage{n}"), data.get(f"adaptation_stage{n}")
            if not isinstance(record, dict):
                continue
            steps = int(record.get("steps") or 0)
            if isinstance(adaptation, dict):
                stages.append(_stage(f"stage {n}", label, key, record.get("history") or [], adaptation,
                                     offset=offset, step_shift=1, threshold=threshold, steps=steps))
            offset += steps
        if not stages:
            ran = [f"stage {n}" for n in (1, 2) if isinstance(data.get(f"stage{n}"), dict)] or ["no stage"]
            raise ConfigError(f"{folder / source} records no adaptation ({' and '.join(ran)} ran with adaptation "
                              "off); distil with adaptation enabled in the GSA config to see births and deaths")
    return Run(folder, source, stages)


def layer_label(bank: str) -> str:
    """``transformer.h.3.attn.attention.gsa.bank`` -> ``layer 3`` (other names as they are)."""
    match = re.search(r"\.(\d+)\.", f".{bank}.")
    return f"layer {match.group(1)}" if match else bank


def adaptation_figure(run: Run | str | Path) -> Any:
    """Loss, alive splats per layer, births and deaths per refine and the shift statistic against steps; returns
    the matplotlib figure."""
    if not isinstance(run, Run):
        run = read_run(run)
    plt = pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(9.0, 9.5), dpi=DPI, sharex=True, layout="constrained",
                             height_ratios=[1.1, 1, 1, 0.9])
    loss_ax, alive_ax, events_ax, shift_ax = axes
    banks = sorted({b for s in run.stages for b in s.alive}, key=lambda b: (len(b), b))
    colours = {b: OKABE_ITO[i % len(OKABE_ITO)] for i, b in enumerate(banks)}
    for i, stage in enumerate(run.stages):
        if stage.loss:
            xs, ys = zip(*stage.loss, strict=True)
            loss_ax.plot(xs, ys, color=OKABE_ITO[(3 + i) % 8], lw=1.4, label=stage.loss_label, gid=GID_LOSS)
        for bank, points in stage.alive.items():
            xs, ys = zip(*points, strict=True)
            alive_ax.step(xs, ys, where="post", color=colours[bank], lw=1.4, gid=GID_ALIVE,
                          label=layer_label(bank) if i == 0 or bank not in run.stages[0].alive else None)
        if stage.births:
            xs, born = zip(*stage.births, strict=True)
            _, dead = zip(*stage.deaths, strict=True)
            width = max(0.8, 0.006 * max(1, run.stages[-1].end))
            events_ax.bar(xs, born, width=width, color=OKABE_ITO[2], gid=GID_BIRTHS,
                          label="births" if i == 0 else None)
            events_ax.bar(xs, [-d for d in dead], width=width, color=OKABE_ITO[4], gid=GID_DEATHS,
                          label="deaths (drawn below 0)" if i == 0 else None)
            events_ax.scatter(xs, [0] * len(xs), marker="|", s=60, color="#000000", zorder=3,
                              label="refine" if i == 0 else None)
        if stage.shift:
            xs, ys = zip(*stage.shift, strict=True)
            shift_ax.plot(xs, ys, color=OKABE_ITO[5], lw=1.3, gid=GID_SHIFT,
                          label="shift statistic" if i == 0 else None)
        if stage.threshold is not None:
            shift_ax.axhline(stage.threshold, color="#555555", ls="--", lw=1.0,
                             label="threshold" if i == 0 else None)
        for j, x in enumerate(stage.shift_events):
            for ax in axes:
                ax.axvline(x, color=OKABE_ITO[5], ls=":", lw=1.0,
                           label="shift detected" if ax is shift_ax and i == 0 and j == 0 else None)
        if i > 0:
            for ax in axes:
                ax.axvline(stage.start, color="#000000", lw=0.8)
            loss_ax.text(stage.start, 1.0, f" {stage.name}", transform=loss_ax.get_xaxis_transform(), va="top",
                         fontsize=8)
    if not any(s.shift for s in run.stages):
        shift_ax.text(0.5, 0.5, "no shift detector in this run (its scheduler is not 'shift')", ha="center",
                      va="center", transform=shift_ax.transAxes, fontsize=9, color="#555555")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss per logged step", fontsize=10)
    alive_ax.set_ylabel("alive splats\n(all heads)")
    alive_ax.set_title("alive splats per GSA layer", fontsize=10)
    events_ax.axhline(0, color="#000000", lw=0.6)
    events_ax.set_ylabel("slots per refine")
    events_ax.set_title("births and deaths at each refine (all layers and heads)", fontsize=10)
    shift_ax.set_ylabel("symmetric KL\nper dimension")
    shift_ax.set_title("shift detector's statistic", fontsize=10)
    shift_ax.set_xlabel("optimizer steps completed")
    for ax in axes:
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="best", framealpha=0.8)
    set_title(fig, f"adaptation over the run in {run.path.name} (from its {run.source})")
    return fig


# ----------------------------------------------------------------------------- gsa viz adaptation
def add_arguments(parser: Any) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="a run folder: gsa train --out (train.json) or gsa distill "
                        "--output (distill.json)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.set_defaults(handler=run_command)


def run_command(args: Any) -> int:
    from gsa_viz.commands import finish
    from gsa_viz.figures import check_out, save_png

    check_out(args.out)
    return finish(save_png(adaptation_figure(read_run(args.run)), args.out))


__all__ = ["RUN_FILES", "Run", "Stage", "adaptation_figure", "add_arguments", "layer_label", "read_run"]
