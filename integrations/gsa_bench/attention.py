"""Attention benchmark: GSA backends against ``scaled_dot_product_attention`` in the same run.

Measures, for causal fp32 attention at batch 1 (DESIGN.md section 6):

- forward and forward+backward wall time and peak memory for n = 512 ... 65536 (powers of two) for
  PyTorch SDPA (``is_causal=True``), the ``kernel`` backend and the ``sparse`` backend (several
  ``(K, top_k)`` pairs, to show that its cost follows ``top_k``, not ``K``); SDPA is stopped once one
  call passes ``--sdpa-limit`` seconds, and that is recorded;
- the speed ratio of each GSA backend against SDPA per n, and the achieved FLOP rate as a fraction
  of this machine's fp32 matmul rate measured in the same run;
- decode time per token with the recurrent state (``prefill`` a context, then single-token
  ``step``) at contexts 1k ... 64k, with the state's size, next to SDPA decoding from a KV cache.

Every case runs in a fresh Python process (``--no-isolate`` turns that off), which keeps the peak
memory measurement honest and lets a crash or out-of-memory kill end only that case.
Writes ``attention.json`` (raw numbers, settings, environment, timestamps), ``attention.md`` and
``attention.png``. The pieces: ``attention_cases`` (the measured cases, worker side), ``attention_flops``
(FLOP accounting: each backend reports its own count), ``attention_report`` (targets, tables, plot).

Run: ``python -m gsa_bench.attention [--quick] [--out DIR]`` or ``gsa bench attention``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from gsa_common import json_object_arg, load_average

from gsa_bench import timing
from gsa_bench.args import parse_sizes
from gsa_bench.attention_cases import CASE_TARGET, SDPA, run_case
from gsa_bench.attention_flops import FLOP_FORMULAS, add_flops, sdpa_flops
from gsa_bench.attention_report import fmt_bytes, markdown_table, plot, summarise
from gsa_bench.scaffold import Benchmark, Run, log, quick_defaults

SCHEMA = "gsa-bench-attention/2"  # 2: the scaffold's run metadata; GSA FLOP counts reported by the backends
MODES = ("fwd", "fwd+bwd")


DEFAULT_SIZES = [2**p for p in range(9, 17)]  # 512 ... 65536

DEFAULT_CONTEXTS = [2**p for p in range(10, 17)]  # 1k ... 64k

QUICK_SIZES = [256, 512, 1024]

QUICK_CONTEXTS = [256, 512, 1024]

DEFAULT_SPARSE = "512:8,512:64,64:8"  # K:top_k pairs


MODE_DOC = {
    "fwd": "forward only, under torch.no_grad() (inference)",
    "fwd+bwd": "forward with autograd, then backward of a fixed random output gradient into q, k, v "
    "(and, for GSA backends, the splat parameters); .grad reset to None after each call",
}



@dataclasses.dataclass(frozen=True)
class Series:
    """One line of the plot: a backend with fixed parameters."""

    label: str
    backend: str
    splats: int | None = None  # K; None for SDPA
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    limit_s: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



def parse_sparse(text: str) -> list[tuple[int, int]]:
    """``"512:8,512:64"`` -> ``[(K, top_k), ...]``."""
    pairs = []
    try:
        for part in text.split(","):
            if part.strip():
                splats, top_k = (int(x) for x in part.split(":"))
                pairs.append((splats, top_k))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparse takes K:top_k pairs like 512:8,512:64, got {text!r}") from None
    return pairs


def build_series(args: argparse.Namespace) -> list[Series]:
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    series: list[Series] = []
    for name in wanted:
        if name == SDPA:
            series.append(Series(SDPA, SDPA, None, {}, args.sdpa_limit))
        elif name == "kernel":
            series.append(Series(f"kernel K={args.splats}", "kernel", args.splats, dict(args.kernel_params),
                                 args.gsa_limit))
        elif name == "sparse":
            for splats, top_k in args.sparse:
                params = {**args.sparse_params, "top_k": top_k}
                series.append(Series(f"sparse K={splats} k={top_k}", "sparse", splats, params, args.gsa_limit))
        else:  # dense, auto or a third-party backend: default params
            series.append(Series(f"{name} K={args.splats}", name, args.splats, {}, args.gsa_limit))
    return series



# ----------------------------------------------------------------------------- orchestration
def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"



class _Runner:
    def __init__(self, args: argparse.Namespace, total: int) -> None:
        self.args, self.total, self.done = args, total, 0

    def __call__(self, payload: dict[str, Any], hard_timeout: float) -> dict[str, Any]:
        load = load_average()
        start = time.perf_counter()
        if self.args.isolate:
            out = timing.run_isolated(CASE_TARGET, payload, timeout_s=hard_timeout,
                                      memory_limit_bytes=int(self.args.memory_limit * 2**30))
        else:
            try:
                out = run_case(payload)
            except Exception as exc:  # one failing case must not end the run
                out = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        out["case_wall_s"] = time.perf_counter() - start
        out["loadavg_1m_before"] = load
        self.done += 1
        return out

    def log(self, text: str) -> None:
        log(self.args, f"[{self.done:3d}/{self.total}] {text}")



def _base_payload(args: argparse.Namespace) -> dict[str, Any]:
    return {"heads": args.heads, "dim": args.head_dim, "seed": args.seed, "threads": args.threads,
            "warmup": args.warmup, "repeats": args.repeats, "max_case_s": args.max_case_seconds}



def run_attention_cases(args: argparse.Namespace, series: list[Series], runner: _Runner,
                        flop_methods: dict[str, str]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    stopped: dict[tuple[str, str], tuple[str, str]] = {}  # (label, mode) -> (status, why) for larger n
    modes = ("fwd",) if args.no_backward else MODES
    for n in args.sizes:
        for s in series:
            for mode in modes:
                row: dict[str, Any] = {"series": s.label, "backend": s.backend, "splats": s.splats,
                                       "params": s.params, "n": n, "mode": mode, "limit_s": s.limit_s}
                skip = stopped.get((s.label, mode)) or (mode == "fwd+bwd" and stopped.get((s.label, "fwd")))
                if skip:
                    row.update({"status": skip[0], "reason": skip[1]})
                    results.append(row)
                    continue
                payload = {**_base_payload(args), "kind": "attention", "backend": s.backend,
                           "splats": s.splats, "params": s.params, "n": n, "mode": mode, "limit_s": s.limit_s}
                hard = 10 * s.limit_s + args.max_case_seconds + 120
                out = runner(payload, hard)
                row.update(out)
                add_flops(row, args.heads, args.head_dim, flop_methods)
                results.append(row)
                if row["status"] in ("stopped", "killed", "error"):
                    why = row.get("reason") or row["status"]
                    stopped[(s.label, mode)] = ("skipped", f"not run: stopped at n={n} ({why})")
                elif row["status"] == "unavailable":
                    stopped[(s.label, mode)] = ("unavailable", row["reason"])
                runner.log(f"n={n:6d} {s.label:22s} {mode:8s} {row['status']:11s} "
                           f"{_fmt_s(row.get('median_s')):>10s}  peak {fmt_bytes(row.get('peak_bytes'))}"
                           + (f"  ({row['reason']})" if row["status"] not in ("ok",) and row.get("reason") else ""))
    return results



def run_decode_cases(args: argparse.Namespace, runner: _Runner) -> list[dict[str, Any]]:
    results = []
    peers = [("kernel", f"kernel K={args.splats}", dict(args.kernel_params)), (SDPA, "sdpa + KV cache", {})]
    for ctx in args.decode_contexts:
        for backend, label, params in peers:
            payload = {**_base_payload(args), "kind": "decode", "backend": backend, "splats": args.splats,
                       "params": params, "context": ctx, "steps": args.decode_steps,
                       "warmup_steps": args.decode_warmup}
            row = {"series": label, "backend": backend, "context": ctx, **runner(payload, 1800)}
            results.append(row)
            runner.log(f"decode ctx={ctx:6d} {label:18s} {row['status']:11s} "
                       + (f"{row['step_ms_median']:.3f} ms/token  state {fmt_bytes(row['state_bytes'])}"
                          if row["status"] == "ok" else str(row.get("reason"))))
    return results



def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    series = build_series(args)
    n_attn = len(args.sizes) * len(series) * (1 if args.no_backward else 2)
    n_dec = 0 if args.no_decode else 2 * len(args.decode_contexts)
    runner = _Runner(args, n_attn + n_dec + len(args.profile_sizes))
    matmul_start = timing.matmul_gflops(args.matmul_size)
    log(args, f"matmul: {matmul_start['gflops_best']:.1f} GFLOP/s fp32 ({args.threads} threads)")
    from gsa_core.registry import get_registry

    registered = get_registry().names("backend")
    flop_methods: dict[str, str] = {}
    attention = run_attention_cases(args, series, runner, flop_methods)
    decode = [] if args.no_decode else run_decode_cases(args, runner)
    profiles = []
    for n in args.profile_sizes:
        payload = {**_base_payload(args), "kind": "profile", "backend": "kernel", "splats": args.splats,
                   "params": dict(args.kernel_params), "n": n}
        row = runner(payload, 1800)
        profiles.append(row)
        if row["status"] == "ok":
            top = ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in row["by_op"][:5])
            runner.log(f"profile kernel fwd n={n}: {top}")
    matmul_end = timing.matmul_gflops(args.matmul_size)
    matmul = {
        "start": matmul_start, "end": matmul_end,
        "gflops_reference": max(matmul_start["gflops_best"], matmul_end["gflops_best"]),
        "reference_rule": "best single call of the start and end measurements (the stricter denominator)",
    }
    report = {
        "schema": SCHEMA,
        "settings": {
            "heads": args.heads, "head_dim": args.head_dim, "splats": args.splats, "batch": 1,
            "dtype": "float32", "causal": True, "sizes": args.sizes, "modes": list(MODES[:1] if args.no_backward
                                                                                  else MODES),
            "mode_doc": MODE_DOC, "sdpa_limit_s": args.sdpa_limit, "gsa_limit_s": args.gsa_limit,
            "warmup": args.warmup, "repeats": args.repeats, "max_case_seconds": args.max_case_seconds,
            "threads": args.threads, "seed": args.seed, "quick": args.quick, "isolated": args.isolate,
            "memory_limit_gib": args.memory_limit if args.isolate else None,
            "series": [s.to_dict() for s in series], "decode_contexts": [] if args.no_decode else args.decode_contexts,
            "decode_steps": args.decode_steps, "decode_warmup_steps": args.decode_warmup,
            "bank": "diagonal covariance, centers ~ N(0, I), std ~ sqrt(d/2), all slots alive; q, k, v ~ N(0, I)",
            "stop_rule": "a (series, mode) whose call exceeds its limit (or fails) is recorded with that single "
            "call and not run at larger n; fwd+bwd is skipped at every n from the one where fwd was stopped",
            "timing": "median wall-clock seconds of the measured calls after warm-up (time.perf_counter); "
            "cpu_times_s: process CPU seconds of each call, all threads (time.process_time)",
        },
        "registered_backends": registered,
        "loadavg_note": "loadavg_1m: system load average; above ~0.5 on this machine other processes competed "
        "for the cores and timings are inflated",
        "matmul": matmul,
        "peak_memory_method": timing.memory_method() if args.isolate else
        timing.memory_method() + " [NOTE: this run used --no-isolate, so cases shared one process]",
        "flop_formulas": FLOP_FORMULAS,
        "flop_methods": flop_methods,
        "results": attention,
        "decode": decode,
        "profile": profiles,
        "profile_note": "torch.profiler (CPU) of one kernel-backend forward after a warm-up; self CPU time "
        "per op, summed over both threads' work as the profiler attributes it",
    }
    summarise(report)
    return report



# ----------------------------------------------------------------------------- command line
def options(parser: argparse.ArgumentParser) -> None:
    """The options of ``gsa bench attention`` besides the scaffold's."""
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="sequence lengths: '512,1024', '1k,64k' or a power-of-two range '512-65536' "
                        "(default 512-65536; --quick: 256,512,1024)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--sdpa-limit", type=float, default=30.0, metavar="SECONDS",
                        help="stop SDPA at larger n once one call takes longer than this (default 30)")
    parser.add_argument("--gsa-limit", type=float, default=120.0, metavar="SECONDS",
                        help="the same limit for the GSA backends (default 120)")
    parser.add_argument("--backends", default="sdpa,kernel,sparse",
                        help="comma list: sdpa, kernel, sparse, or any registered backend (default sdpa,kernel,sparse)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads H (default 12)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension d (default 64)")
    parser.add_argument("--splats", type=int, default=64, help="splats per head K for kernel/dense (default 64)")
    parser.add_argument("--sparse", type=parse_sparse, default=None, metavar="K:TOPK,...",
                        help=f"sparse backend configurations (default {DEFAULT_SPARSE})")
    parser.add_argument("--kernel-params", type=json_object_arg, default={}, metavar="JSON",
                        help="params of the kernel backend, e.g. '{\"chunk_size\": 64}'")
    parser.add_argument("--sparse-params", type=json_object_arg, default={}, metavar="JSON",
                        help="extra params of the sparse backend (top_k comes from --sparse)")
    parser.add_argument("--decode-contexts", type=parse_sizes, default=None,
                        help="prefill lengths for the decode test (default 1k-64k; --quick: 256,512,1024)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 300; quick 50)")
    parser.add_argument("--decode-warmup", type=int, default=10, help="untimed decode steps first (default 10)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode measurement")
    parser.add_argument("--profile-sizes", type=lambda t: parse_sizes(t) if t.strip() else [], default=None,
                        help="n at which one kernel forward is profiled by op ('' for none; default 2048,16384; "
                        "--quick: none)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5; quick 3)")
    parser.add_argument("--max-case-seconds", type=float, default=None,
                        help="stop repeating a case once its timed calls add up to this (default 60; quick 5)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="size of the reference sgemm (default 2048)")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                        help="address space a case may add before it fails with an allocation error "
                        "(isolated runs only; default half the machine's memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                        help="run every case in a fresh process (default, except with --quick)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every case in this process (faster, but peak memory is less precise and "
                        "--memory-limit does not apply)")



def _apply_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.isolate is None:
        args.isolate = not quick
    quick_defaults(args, {"sizes": (QUICK_SIZES, DEFAULT_SIZES), "decode_contexts": (QUICK_CONTEXTS, DEFAULT_CONTEXTS),
                          "decode_steps": (50, 300), "repeats": (3, 5), "max_case_seconds": (5.0, 60.0),
                          "profile_sizes": ([], [2048, 16384])})
    if args.sparse is None:
        args.sparse = parse_sparse(DEFAULT_SPARSE)
    if args.memory_limit is None:
        total = timing.mem_total_bytes()
        args.memory_limit = round(total / 2 / 2**30, 1) if total else 8.0
    for label in ("heads", "head_dim", "splats", "repeats", "decode_steps"):
        if getattr(args, label) < 1:
            raise SystemExit(f"--{label.replace('_', '-')} must be >= 1")



def summary_text(report: dict[str, Any]) -> str:
    """The human summary printed after a run (the markdown tables, readable as plain text too)."""
    lines = [markdown_table(report)]
    for prof in report.get("profile") or []:
        if prof.get("status") == "ok":
            top = ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in prof["by_op"][:6])
            lines.append(f"profile of one kernel forward at n={prof['n']}: {top}")
    bad = [r for r in report["results"] if r.get("status") in ("error", "killed", "unavailable")]
    seen: set[tuple[str, str]] = set()
    for r in bad:
        key = (r["series"], r.get("reason", ""))
        if key not in seen:
            seen.add(key)
            lines.append(f"note: {r['series']}: {r['status']}: {r.get('reason')}")
    return "\n".join(lines)



BENCHMARK = Benchmark("attention", __doc__.split("\n\n")[0], options, measure, markdown=markdown_table, plot=plot,
                      summary=summary_text, prepare=_apply_defaults,
                      quick_help="smoke run, about a minute: small sizes and contexts, fewer repeats")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main

__all__ = ["BENCHMARK", "MODES", "SCHEMA", "Series", "add_arguments", "build_series", "main", "markdown_table",
           "measure", "parse_sizes", "parse_sparse", "run", "run_case", "sdpa_flops"]

if __name__ == "__main__":
    sys.exit(main())
