"""Adaptation benchmark: GSA with birth/death of splats against the same GSA without, across a shift.

The task (``gsa_core.synthetic.ClusteredStream``): each head's queries and keys come from a mixture of
Gaussian clusters; at ``--shift-at`` the clusters move (``--shift-fraction`` of them, by
``--shift-magnitude``). A ``GSAAttention`` layer is trained - splat parameters only, the situation of
stage-1 distillation - to reproduce a teacher attention on the same queries, keys and values: the
Gaussian-kernel attention ``softmax_j(-|q_i - k_j|² / (2 tau²)) v_j`` (``v = k W_v``, a fixed random map
per head). The loss is the output MSE divided by the teacher output's variance.

Every variant (adaptation off, or a scheduler/death/birth combination) starts from the same
initialised bank (``random`` initializer on pre-shift data) and sees the same batches, for the same
number of steps and the same capacity, for each seed. Reported per run and aggregated over seeds:

- ``pre_shift_loss``: mean loss over the last ``--eval-window`` steps before the shift;
- ``loss_after_shift``: mean loss over the ``--after-window`` steps after it; ``final_loss``: the last
  ``--eval-window`` steps;
- ``steps_to_recover``: first step after the shift at which the trailing ``--eval-window``-step mean loss
  is within ``(1 + --recover-tol)`` of the run's own pre-shift loss (None: not within the budget);
- births, deaths and refines that actually happened (the controller's records), and shift detections.

The statistics overhead is measured separately on the same layer: training steps with the controller
collecting statistics (never refining) against plain training steps, interleaved, median of repeats,
reported as a percentage of the plain step.

Writes ``adaptation.json`` and ``adaptation.png``. Run: ``python -m gsa_bench.adaptation [--quick]`` or
``gsa bench adaptation``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from gsa_bench.scaffold import Benchmark, Run, log, pyplot, quick_defaults

SCHEMA = "gsa-bench-adaptation/2"  # 2: the scaffold's run metadata (started, finished, loadavg_1m)

#: Adaptation variants compared with "off". Each is an ``adaptation`` config section (enabled implied).
VARIANTS: dict[str, dict[str, Any]] = {
    "off": {},
    "interval+coverage": {
        "scheduler": {"name": "interval", "params": {"start": 50, "every": 25}},
        "death": {"name": "low-mass", "params": {"relative_threshold": 0.05}},
        "birth": {"name": "coverage", "params": {"max_per_head": 8}},
    },
    "shift+coverage": {
        "scheduler": {"name": "shift", "params": {"threshold": 0.25, "window": 10, "delay": 5, "burst": 4,
                                                   "burst_every": 10}},
        "death": {"name": "low-mass", "params": {"relative_threshold": 0.05}},
        "birth": {"name": "coverage", "params": {"max_per_head": 8}},
    },
    "interval+relocate": {
        "scheduler": {"name": "interval", "params": {"start": 50, "every": 25}},
        "death": {"name": "low-mass", "params": {"relative_threshold": 0.05}},
        "birth": {"name": "relocate", "params": {"jitter": 0.5}},
    },
    "shift+relocate": {
        "scheduler": {"name": "shift", "params": {"threshold": 0.25, "window": 10, "delay": 5, "burst": 4,
                                                   "burst_every": 10}},
        "death": {"name": "low-mass", "params": {"relative_threshold": 0.05}},
        "birth": {"name": "relocate", "params": {"jitter": 0.5}},
    },
    "interval+coverage-r1.5": {
        "scheduler": {"name": "interval", "params": {"start": 50, "every": 25}},
        "death": {"name": "low-mass", "params": {"relative_threshold": 0.05}},
        "birth": {"name": "coverage", "params": {"max_per_head": 8, "radius": 1.5}},
    },
    "interval+split": {
        "scheduler": {"name": "interval", "params": {"start": 50, "every": 25}},
        "death": {"name": "low-mass", "params": {"relative_threshold": 0.05}},
        "birth": {"name": "split", "params": {"max_per_head": 8}},
    },
}
DEFAULT_VARIANTS = "off,interval+relocate,shift+relocate,interval+coverage,shift+coverage,interval+split"


# ----------------------------------------------------------------------------- the task
def make_task(args: argparse.Namespace, seed: int):
    import torch

    from gsa_core.synthetic import ClusteredStream

    stream = ClusteredStream(
        n_heads=args.heads, head_dim=args.head_dim, n_clusters=args.clusters, spread=args.spread,
        cluster_std=args.cluster_std, shift_at=args.shift_at, shift_fraction=args.shift_fraction,
        shift_magnitude=args.shift_magnitude, seed=seed,
    )
    g = torch.Generator().manual_seed(10_000 + seed)
    w_v = torch.randn(args.heads, args.head_dim, args.head_dim, generator=g) / math.sqrt(args.head_dim)
    return stream, w_v


def teacher(q, k, v, tau: float):
    import torch

    logits = -torch.cdist(q, k).square() / (2 * tau * tau)
    return torch.softmax(logits, dim=-1) @ v


def batch_at(stream, w_v, step: int, args: argparse.Namespace):
    q, k, _ = stream.sample(step, args.batch, args.length)
    v = k @ w_v.unsqueeze(0)
    return q, k, v, teacher(q, k, v, args.tau)


def gsa_config(args: argparse.Namespace, variant: dict[str, Any], seed: int):
    from gsa_core.config import GSAConfig

    adaptation: dict[str, Any] = {"enabled": bool(variant), "window": args.window}
    adaptation.update(copy.deepcopy(variant))
    return GSAConfig.from_dict({
        "seed": seed,
        "bank": {"n_splats": args.splats, "covariance": args.covariance, "min_alive": args.min_alive},
        "initializer": "random",
        "backend": args.backend,
        "adaptation": adaptation,
    })


def build_layer(args: argparse.Namespace, config, stream, seed: int):
    import torch

    from gsa_core.attention import GSAAttention

    torch.manual_seed(seed)
    layer = GSAAttention(args.heads, args.head_dim, config)
    q0, k0, _ = stream.sample(0, args.batch, args.length)
    flat = lambda x: x.transpose(0, 1).reshape(args.heads, -1, args.head_dim)  # noqa: E731
    layer.initialize(flat(q0), flat(k0), generator=torch.Generator().manual_seed(seed))
    return layer


def train_run(args: argparse.Namespace, variant_name: str, seed: int) -> dict[str, Any]:
    """One training run; returns the loss curve, the refine history and the summary numbers."""
    import torch

    from gsa_core.adaptation import AdaptationController, apply_update
    from gsa_core.masks import MaskSpec

    variant = VARIANTS[variant_name]
    stream, w_v = make_task(args, seed)
    config = gsa_config(args, variant, seed)
    layer = build_layer(args, config, stream, seed)
    opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
    controller = AdaptationController(layer, config, opt, stats_every=args.stats_every) \
        if config.adaptation.enabled else None
    mask = MaskSpec(causal=args.causal)
    losses: list[float] = []
    alive: list[int] = []
    start = time.perf_counter()
    for step in range(args.steps):
        q, k, v, target = batch_at(stream, w_v, step, args)
        if args.causal:
            target = causal_teacher(q, k, v, args.tau)
        out = layer(q, k, v, mask)
        loss = (out - target).square().mean() / target.var().clamp_min(1e-12)
        loss.backward()
        apply_update(opt, step, controller=controller)
        losses.append(float(loss.detach()))
        alive.append(int(layer.bank.alive.sum()))
    elapsed = time.perf_counter() - start
    report = controller.report() if controller is not None else None
    out = {
        "variant": variant_name, "seed": seed, "losses": losses, "alive": alive, "seconds": elapsed,
        "refines": report["refines"] if report else {"refines": 0, "births": 0, "deaths": 0},
        "shift_events": report["shift_events"] if report else [],
    }
    out.update(summarise_curve(losses, args))
    if controller is not None:
        controller.remove_hooks()
        out["births_after_shift"] = sum(
            r["births"] for r in report["history"] if r["step"] >= args.shift_at)
        out["deaths_after_shift"] = sum(
            r["deaths"] for r in report["history"] if r["step"] >= args.shift_at)
    else:
        out["births_after_shift"] = out["deaths_after_shift"] = 0
    return out


def causal_teacher(q, k, v, tau: float):
    import torch

    logits = -torch.cdist(q, k).square() / (2 * tau * tau)
    n_q, n_k = logits.shape[-2:]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def _trailing_mean(values: list[float], end: int, width: int) -> float:
    lo = max(0, end - width + 1)
    chunk = values[lo:end + 1]
    return sum(chunk) / len(chunk)


def summarise_curve(losses: list[float], args: argparse.Namespace) -> dict[str, Any]:
    s, w = args.shift_at, args.eval_window
    pre = statistics.fmean(losses[max(0, s - w):s])
    after = statistics.fmean(losses[s:s + args.after_window])
    final = statistics.fmean(losses[-w:])
    peak = max(losses[s:s + max(1, w)])
    recover = None
    for t in range(s, len(losses)):
        if t - s + 1 >= w and _trailing_mean(losses, t, w) <= pre * (1 + args.recover_tol):
            recover = t - s
            break
    return {"pre_shift_loss": pre, "loss_after_shift": after, "final_loss": final, "peak_loss": peak,
            "steps_to_recover": recover}


# ----------------------------------------------------------------------------- overhead
class _Block:
    """Factory for the model-level overhead case: a small pre-norm transformer on continuous inputs."""

    @staticmethod
    def build(args: argparse.Namespace, config, layers: int, width: int, heads: int):
        import torch
        from torch import nn

        from gsa_core.attention import GSAMultiheadAttention

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
                self.attn = GSAMultiheadAttention(width, heads, config=config)
                self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

            def forward(self, x):
                x = x + self.attn(self.norm1(x), is_causal=True)[0]
                return x + self.mlp(self.norm2(x))

        torch.manual_seed(0)
        return nn.Sequential(*[Block() for _ in range(layers)])


def measure_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time per training step: plain vs with the controller collecting statistics, never refining.

    Cases: the benchmark's bare GSA layer, the same layer on long sequences, and a small transformer
    (``--overhead-model``: layers x width, causal GSA attention + MLP, Adam over every weight). Arms:
    statistics every step with 512 and 128 query tokens, and every 4th step. Blocks of 4 steps per arm,
    arms interleaved in rotating order, median (and min) over ``--overhead-repeats`` blocks.
    """
    import torch

    from gsa_core.adaptation import AdaptationController, apply_update
    from gsa_core.masks import MaskSpec

    stream, w_v = make_task(args, 0)
    never = {"scheduler": {"name": "interval", "params": {"start": 10**9, "every": 1}},
             "death": "low-mass", "birth": "coverage"}
    config = gsa_config(args, never, 0)
    arms: dict[str, tuple[int, int] | None] = {
        "plain": None,
        "stats every step, 512 tokens": (1, 512),
        "stats every step, 128 tokens": (1, 128),
        "stats every 4th step, 512 tokens (default)": (4, 512),
    }
    layers, width = args.overhead_model
    cases = [("bare GSA layer, benchmark task", args.length, args.batch, None),
             ("bare GSA layer, long sequences", args.overhead_length, args.overhead_batch, None),
             (f"transformer {layers}x{width}, causal", args.overhead_length // 2, args.overhead_batch, "model")]
    results = {}
    for label, length, batch, kind in cases:
        if kind == "model":
            model = _Block.build(args, config, layers, width, max(1, width // 32))
            x = torch.randn(batch, length, width, generator=torch.Generator().manual_seed(0))
            target = torch.randn_like(x)

            def forward(model=model, x=x, target=target):
                return (model(x) - target).square().mean()
        else:
            model = build_layer(args, config, stream, 0)
            q, k, _ = stream.sample(0, batch, length)
            v = k @ w_v.unsqueeze(0)
            target = torch.randn_like(v)
            mask = MaskSpec(causal=args.causal)

            def forward(model=model, q=q, k=k, v=v, target=target, mask=mask):
                return (model(q, k, v, mask) - target).square().mean()

        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        controller = AdaptationController(model, config, opt)

        def block(arm: tuple[int, int] | None, forward=forward, opt=opt, controller=controller) -> float:
            controller.enabled = arm is not None
            every, tokens = arm or (1, 512)
            controller.stats_every = every
            for t in controller.banks:
                t.stats.max_tokens = tokens
            controller.collect_next_step()
            t0 = time.perf_counter()
            for i in range(4):
                forward().backward()
                apply_update(opt, i, controller=controller)
            return (time.perf_counter() - t0) / 4

        names = list(arms)
        for name in names:  # warm-up
            block(arms[name])
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.overhead_repeats):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                times[name].append(block(arms[name]))
        controller.remove_hooks()
        plain, plain_min = statistics.median(times["plain"]), min(times["plain"])
        entry: dict[str, Any] = {"batch": batch, "length": length, "banks": len(controller.banks),
                                 "plain_step_s": plain, "plain_step_min_s": plain_min,
                                 "blocks": args.overhead_repeats, "steps_per_block": 4}
        for name in names[1:]:
            med, best = statistics.median(times[name]), min(times[name])
            entry[name] = {"step_s": med, "overhead_percent": 100.0 * (med - plain) / plain,
                           "step_min_s": best, "overhead_percent_of_min": 100.0 * (best - plain_min) / plain_min}
        results[label] = entry
    return results


# ----------------------------------------------------------------------------- driver
def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs in by.items():
        def col(key: str, rows: list[dict[str, Any]] = rs) -> list[Any]:
            return [r[key] for r in rows]
        rec = col("steps_to_recover")
        out[name] = {
            "seeds": col("seed"),
            "pre_shift_loss_mean": statistics.fmean(col("pre_shift_loss")),
            "loss_after_shift_mean": statistics.fmean(col("loss_after_shift")),
            "loss_after_shift_per_seed": col("loss_after_shift"),
            "final_loss_mean": statistics.fmean(col("final_loss")),
            "steps_to_recover_per_seed": rec,
            "recovered_runs": sum(x is not None for x in rec),
            "steps_to_recover_median": statistics.median([x if x is not None else math.inf for x in rec]),
            "births_per_seed": [r["refines"]["births"] for r in rs],
            "deaths_per_seed": [r["refines"]["deaths"] for r in rs],
            "births_after_shift_per_seed": col("births_after_shift"),
            "deaths_after_shift_per_seed": col("deaths_after_shift"),
            "refines_per_seed": [r["refines"]["refines"] for r in rs],
            "shift_events_per_seed": col("shift_events"),
            "seconds_mean": statistics.fmean(col("seconds")),
        }
    return out


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    runs = []
    for seed in args.seeds:
        for name in names:
            r = train_run(args, name, seed)
            runs.append(r)
            log(args, f"seed {seed} {name:>20}: pre {r['pre_shift_loss']:.4f} after {r['loss_after_shift']:.4f} "
                      f"final {r['final_loss']:.4f} recover {r['steps_to_recover']} births "
                      f"{r['refines']['births']} deaths {r['refines']['deaths']} ({r['seconds']:.0f}s)")
    overhead = measure_overhead(args) if not args.no_overhead else None
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"}
    return {
        "schema": SCHEMA,
        "settings": settings,
        "variants": {n: VARIANTS[n] for n in names},
        "task": __doc__.split("\n\n")[1],
        "summary": aggregate(runs),
        "statistics_overhead": overhead,
        "runs": runs,
    }


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()
    settings = report["settings"]
    shift = settings["shift_at"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(report["summary"])
    for i, name in enumerate(names):
        rs = [r for r in report["runs"] if r["variant"] == name]
        curves = [r["losses"] for r in rs]
        n = min(len(c) for c in curves)
        w = 10
        mean = [statistics.fmean(c[t] for c in curves) for t in range(n)]
        smooth = [statistics.fmean(mean[max(0, t - w + 1):t + 1]) for t in range(n)]
        axes[0].plot(range(n), smooth, label=name, color=colors[i % len(colors)], lw=1.5 if name != "off" else 2.2)
        alive = [statistics.fmean(r["alive"][t] for r in rs) for t in range(n)]
        axes[1].plot(range(n), alive, label=name, color=colors[i % len(colors)])
    for ax in axes:
        ax.axvline(shift, color="k", ls="--", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"normalised MSE (mean of {len(settings['seeds'])} seeds, {10}-step mean)")
    axes[0].set_title("loss; dashed: distribution shift")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("alive splats (all heads)")
    axes[1].set_title("alive splats")
    return fig


def summary_text(report: dict[str, Any]) -> str:
    lines = ["| variant | pre-shift loss | loss after shift | final loss | steps to recover (per seed) | "
             "births / deaths (per seed) |", "|---|---|---|---|---|---|"]
    for name, s in report["summary"].items():
        rec = ", ".join("-" if x is None else str(x) for x in s["steps_to_recover_per_seed"])
        bd = ", ".join(f"{b}/{d}" for b, d in zip(s["births_per_seed"], s["deaths_per_seed"], strict=True))
        lines.append(f"| {name} | {s['pre_shift_loss_mean']:.4f} | {s['loss_after_shift_mean']:.4f} | "
                     f"{s['final_loss_mean']:.4f} | {rec} | {bd} |")
    ov = report.get("statistics_overhead")
    if ov:
        for label, o in ov.items():
            arms = ", ".join(f"{k}: {v['overhead_percent']:+.1f}%" for k, v in o.items() if isinstance(v, dict))
            lines.append(f"statistics overhead ({label}, B={o['batch']}, n={o['length']}, plain step "
                         f"{1000 * o['plain_step_s']:.1f} ms): {arms}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def options(parser: argparse.ArgumentParser) -> None:
    """The options of ``gsa bench adaptation`` besides the scaffold's."""
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=None,
                        help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--variants", default=None, help=f"comma list from: {', '.join(VARIANTS)} "
                        f"(default {DEFAULT_VARIANTS})")
    parser.add_argument("--steps", type=int, default=None, help="training steps in all (default 900)")
    parser.add_argument("--shift-at", type=int, default=None, help="step of the shift (default 300)")
    parser.add_argument("--shift-fraction", type=float, default=1.0, help="fraction of clusters that move")
    parser.add_argument("--shift-magnitude", type=float, default=1.0, help="0: none, 1: fresh cluster centers")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--splats", type=int, default=32, help="capacity K per head (same for every variant)")
    parser.add_argument("--covariance", default="diagonal", choices=("isotropic", "diagonal", "full"))
    parser.add_argument("--min-alive", type=int, default=4)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--spread", type=float, default=3.0, help="std of cluster centers")
    parser.add_argument("--cluster-std", type=float, default=0.3, help="std of tokens around their center")
    parser.add_argument("--tau", type=float, default=0.5, help="teacher kernel width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--causal", action="store_true", help="causal attention (teacher and GSA)")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--window", type=int, default=20, help="adaptation statistics window (steps)")
    parser.add_argument("--backend", default="kernel")
    parser.add_argument("--stats-every", type=int, default=4,
                        help="the controller observes every n-th step (default 4, the controller's default)")
    parser.add_argument("--eval-window", type=int, default=20)
    parser.add_argument("--after-window", type=int, default=100)
    parser.add_argument("--recover-tol", type=float, default=0.5,
                        help="recovered when the trailing mean loss <= (1 + tol) x pre-shift loss")
    parser.add_argument("--no-overhead", action="store_true", help="skip the statistics overhead measurement")
    parser.add_argument("--overhead-repeats", type=int, default=None, help="timed 4-step blocks per arm (default 30)")
    parser.add_argument("--overhead-length", type=int, default=512, help="sequence length of the 2nd overhead case")
    parser.add_argument("--overhead-batch", type=int, default=4)
    parser.add_argument("--overhead-model", type=lambda t: tuple(int(x) for x in t.split("x")), default=(2, 128),
                        metavar="LAYERSxWIDTH", help="the transformer of the overhead measurement (default 2x128)")


def _apply_defaults(args: argparse.Namespace) -> None:
    q = args.quick
    quick_defaults(args, {"seeds": ([0], [0, 1, 2]), "variants": ("off,interval+coverage", DEFAULT_VARIANTS),
                          "steps": (160, 900), "shift_at": (80, 300), "overhead_repeats": (3, 30)})
    if q:
        args.after_window = min(args.after_window, 40)
        args.overhead_length = min(args.overhead_length, 256)
    if not 0 < args.shift_at < args.steps:
        raise SystemExit("--shift-at must lie inside (0, --steps)")


# 1 thread by default: the per-step work is small, and on a shared machine more threads mostly wait for each other
BENCHMARK = Benchmark("adaptation", __doc__.split("\n\n")[0], options, measure, plot=plot, summary=summary_text,
                      prepare=_apply_defaults, threads=1, quick_help="smoke run: 1 seed, few steps, two variants")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
