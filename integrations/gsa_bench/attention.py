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
Writes ``attention.json`` (raw numbers, settings, environment, timestamps) and ``attention.png``.

Run: ``python -m gsa_bench.attention [--quick] [--out DIR]`` or ``gsa bench attention``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gsa_common
from gsa_common import json_object_arg

from gsa_bench import timing

SCHEMA = "gsa-bench-attention/1"
CASE_TARGET = "gsa_bench.attention:run_case"
SDPA = "sdpa"
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

FLOP_FORMULAS = {
    "sdpa_fwd": "2 matmuls (QK^T, PV) over the causal triangle: 2 * 2*d * n(n+1)/2 * H = 2*d*H*n*(n+1)",
    "fwd+bwd": "3 x the forward count (convention: backward does about twice the forward's matmul work); "
    "only used for the fwd+bwd GFLOP/s column",
    "kernel_fwd": "B*H*n*(8*d*K + 4*K*d_v + 2*C*(K + d_v)), C = chunk_size (64), d_v = d: the matmuls of "
    "gsa_plugins/backends/kernel.py's causal chunked form: log-features of q and k (diagonal covariance: "
    "x^2 @ inv_var^T and x @ (mu*inv_var)^T, 2*n*d*K each, for q and for k: 8*n*d*K), per chunk "
    "u = Q^T V (2*C*K*d_v), the intra-chunk weights P Q^T (2*C*C*K) and w V (2*C*C*d_v), and the "
    "past-state readout p_past M (2*C*K*d_v). Elementwise work (exp, log, max, the chunk recurrence's "
    "rescaling, about a dozen passes over [n, K] tensors) is not counted, so the fraction of the matmul "
    "rate counts useful matmul work only",
    "sparse_fwd": "B*H*(8*n*d*K + 2*n*top_k*scan_block*d + 2*n*top_k*d): log-features of q and k against all K "
    "splats (diagonal covariance: two GEMMs of 2*n*d*K each, per q and per k), the causal segmented scan's "
    "[scan_block, scan_block] tiles times values over the n*top_k key events, and the top_k readout; "
    "top-k selection, the sort of n*top_k events, exp/log and gathers are not counted",
}


# ----------------------------------------------------------------------------- FLOP models
def sdpa_flops(n: int, heads: int, dim: int, batch: int = 1) -> float:
    return 2.0 * dim * heads * n * (n + 1) * batch


def kernel_flops(n: int, heads: int, dim: int, splats: int, chunk: int | None = None, batch: int = 1) -> float:
    """Matmul FLOPs of the kernel backend's causal forward (see ``FLOP_FORMULAS['kernel_fwd']``)."""
    c = chunk or 64
    dv = dim
    return float(batch * heads * n * (8 * dim * splats + 4 * splats * dv + 2 * c * (splats + dv)))


def sparse_flops(n: int, heads: int, dim: int, splats: int, top_k: int, scan_block: int = 64,
                 batch: int = 1) -> float:
    """Matmul FLOPs of the sparse backend's causal forward (see ``FLOP_FORMULAS['sparse_fwd']``)."""
    top_k = min(top_k, splats)
    return float(batch * heads * (8 * n * dim * splats + 2 * n * top_k * scan_block * dim + 2 * n * top_k * dim))


# ----------------------------------------------------------------------------- what to run
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


def parse_sizes(text: str) -> list[int]:
    """``"512,1024"``, ``"1k,64k"`` or a power-of-two range ``"512-65536"`` -> sorted sizes."""
    sizes: set[int] = set()

    def one(tok: str) -> int:
        tok = tok.strip().lower()
        value = int(tok[:-1]) * 1024 if tok.endswith("k") else int(tok)
        if value < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {tok!r}")
        return value

    try:
        for part in text.split(","):
            if not part.strip():
                continue
            if "-" in part:
                lo, hi = (one(p) for p in part.split("-", 1))
                while lo <= hi:
                    sizes.add(lo)
                    lo *= 2
            else:
                sizes.add(one(part))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size list {text!r}: {exc}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("empty size list")
    return sorted(sizes)


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


# ----------------------------------------------------------------------------- one case (worker side)
def make_bank(heads: int, dim: int, splats: int, seed: int) -> Any:
    """A diagonal-covariance bank whose splats overlap the N(0, I) inputs (no underflow everywhere)."""
    import torch

    from gsa_core.bank import SplatBank

    gen = torch.Generator().manual_seed(seed + 1)
    bank = SplatBank(heads, dim, splats, covariance="diagonal")
    with torch.no_grad():
        bank.centers.copy_(torch.randn(bank.centers.shape, generator=gen))
        bank.log_scale.copy_(0.5 * math.log(dim / 2) + 0.1 * torch.randn(bank.log_scale.shape, generator=gen))
        bank.log_amplitude.copy_(0.1 * torch.randn(bank.log_amplitude.shape, generator=gen))
    return bank


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def tensor_bytes(obj: Any) -> tuple[int, int, list[str]]:
    """Logical bytes, bytes of distinct storages, and ``name: shape dtype`` lines of every tensor in ``obj``."""
    import torch

    logical, storages, lines, seen = 0, {}, [], set()

    def walk(x: Any, path: str) -> None:
        nonlocal logical
        if id(x) in seen:
            return
        if isinstance(x, torch.Tensor):
            seen.add(id(x))
            logical += x.numel() * x.element_size()
            storage = x.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            lines.append(f"{path}: {list(x.shape)} {str(x.dtype).removeprefix('torch.')}")
            return
        if isinstance(x, (str, bytes, int, float, bool)) or x is None:
            return
        seen.add(id(x))
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name), f"{path}.{f.name}" if path else f.name)
        elif hasattr(x, "__dict__"):
            for k, v in vars(x).items():
                walk(v, f"{path}.{k}" if path else k)

    walk(obj, "")
    return logical, sum(storages.values()), lines


def _gsa_backend(payload: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    from gsa_core.registry import get_registry

    registry = get_registry()
    names = registry.names("backend")
    if payload["backend"] not in names:
        return None, {"status": "unavailable",
                      "reason": f"backend {payload['backend']!r} is not registered (available: {', '.join(names)})"}
    return registry.build("backend", payload["backend"], payload.get("params") or {}), None


def source_fingerprint(obj: Any) -> dict[str, Any] | None:
    """File and sha256 (first 16 hex digits) of the module defining ``obj``'s class: which code was timed."""
    import hashlib
    import inspect

    try:
        path = inspect.getsourcefile(type(obj))
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None
    except (OSError, TypeError):
        return None
    return {"file": path, "sha256_16": digest}


def _attention_case(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from gsa_core.masks import MaskSpec

    heads, dim, n, mode = p["heads"], p["dim"], p["n"], p["mode"]
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    leaves: list[torch.Tensor] = [q, k, v]
    info: dict[str, Any] = {}
    if p["backend"] == SDPA:
        def forward() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        backend, failure = _gsa_backend(p)
        if failure:
            return failure
        bank = make_bank(heads, dim, p["splats"], p["seed"])
        leaves += list(bank.slot_parameters().values())
        causal = MaskSpec(causal=True)

        def forward() -> torch.Tensor:
            out, extra = backend.forward(q, k, v, bank, causal)
            if not info:
                info.update(_jsonable(extra))
            return out

    if mode == "fwd":
        def call() -> None:
            with torch.no_grad():
                forward()
    else:
        for t in (q, k, v):
            t.requires_grad_(True)
        grad_out = torch.randn(1, heads, n, dim, generator=gen)

        def call() -> None:
            forward().backward(grad_out)
            for t in leaves:
                t.grad = None

    m = timing.measure(call, warmup=p["warmup"], repeats=p["repeats"], budget_s=p["limit_s"],
                       max_total_s=p["max_case_s"])
    source = None if p["backend"] == SDPA else source_fingerprint(backend)
    return {"status": "stopped" if m.stopped else "ok", **m.to_dict(), "backend_info": info,
            "backend_source": source, "input_bytes": 3 * n * heads * dim * 4}


def _decode_case(p: dict[str, Any]) -> dict[str, Any]:
    """Prefill ``context`` tokens, then time ``steps`` single-token decode steps."""
    import torch
    import torch.nn.functional as F

    from gsa_core.masks import MaskSpec

    heads, dim, ctx = p["heads"], p["dim"], p["context"]
    steps, warm = p["steps"], p["warmup_steps"]
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v = (torch.randn(1, heads, ctx, dim, generator=gen) for _ in range(3))
    tokens = torch.randn(warm + steps, 3, 1, heads, 1, dim, generator=gen)
    times: list[float] = []
    result: dict[str, Any] = {"context": ctx}
    with torch.no_grad():
        if p["backend"] == SDPA:
            total = ctx + warm + steps
            k_cache, v_cache = torch.empty(1, heads, total, dim), torch.empty(1, heads, total, dim)
            k_cache[..., :ctx, :], v_cache[..., :ctx, :] = k, v
            del q, k, v
            for i in range(warm + steps):
                qi, ki, vi = tokens[i]
                start = time.perf_counter()
                pos = ctx + i
                k_cache[..., pos : pos + 1, :] = ki
                v_cache[..., pos : pos + 1, :] = vi
                F.scaled_dot_product_attention(qi, k_cache[..., : pos + 1, :], v_cache[..., : pos + 1, :])
                elapsed = time.perf_counter() - start
                if i >= warm:
                    times.append(elapsed)
            _, storage, lines = tensor_bytes({"k_cache": k_cache, "v_cache": v_cache})
            result.update({"prefill_s": None, "state_bytes": (ctx + warm + steps) * heads * dim * 4 * 2,
                           "state_storage_bytes": storage, "state_tensors": lines,
                           "state_note": "KV cache preallocated for context + steps tokens; grows with context"})
        else:
            backend, failure = _gsa_backend(p)
            if failure:
                return failure
            bank = make_bank(heads, dim, p["splats"], p["seed"])
            with timing.PeakMemory() as mem:
                start = time.perf_counter()
                _, state = backend.prefill(q, k, v, bank, MaskSpec(causal=True))
                prefill_s = time.perf_counter() - start
            del q, k, v
            before = tensor_bytes(state)
            for i in range(warm + steps):
                qi, ki, vi = tokens[i]
                start = time.perf_counter()
                _, state = backend.step(qi, ki, vi, bank, state)
                elapsed = time.perf_counter() - start
                if i >= warm:
                    times.append(elapsed)
            after = tensor_bytes(state)
            result.update({"prefill_s": prefill_s, "prefill_peak_bytes": mem.peak_bytes,
                           "backend_source": source_fingerprint(backend),
                           "state_bytes": before[0], "state_storage_bytes": before[1], "state_tensors": before[2],
                           "state_bytes_after_steps": after[0]})
    ordered = sorted(times)
    result.update({
        "status": "ok", "steps": steps, "warmup_steps": warm,
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_mean": 1e3 * statistics.fmean(times),
        "step_ms_p10": 1e3 * ordered[len(ordered) // 10],
        "step_ms_p90": 1e3 * ordered[(9 * len(ordered)) // 10],
    })
    return result


def _profile_case(p: dict[str, Any]) -> dict[str, Any]:
    """One profiled forward (after a warm-up): where the time goes, by op and by op + input shapes."""
    import torch

    from gsa_core.masks import MaskSpec

    heads, dim, n = p["heads"], p["dim"], p["n"]
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    backend, failure = _gsa_backend(p)
    if failure:
        return failure
    bank = make_bank(heads, dim, p["splats"], p["seed"])
    causal = MaskSpec(causal=True)
    with torch.no_grad():
        backend.forward(q, k, v, bank, causal)
        start = time.perf_counter()
        backend.forward(q, k, v, bank, causal)
        plain_s = time.perf_counter() - start
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            backend.forward(q, k, v, bank, causal)

    def table(events: Any, with_shapes: bool, limit: int) -> list[dict[str, Any]]:
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
        return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                 "calls": e.count, **({"input_shapes": str(e.input_shapes)} if with_shapes else {})}
                for e in rows]

    by_op = prof.key_averages()
    return {"status": "ok", "n": n, "backend": p["backend"], "unprofiled_forward_s": plain_s,
            "backend_source": source_fingerprint(backend),
            "profiled_total_self_ms": sum(e.self_cpu_time_total for e in by_op) / 1e3,
            "by_op": table(by_op, False, 15),
            "by_op_and_shape": table(prof.key_averages(group_by_input_shape=True), True, 15)}


def run_case(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one case described by ``payload`` (a JSON object) and return a JSON object."""
    import torch

    torch.set_num_threads(payload["threads"])
    torch.manual_seed(payload["seed"])
    if payload["kind"] == "decode":
        return _decode_case(payload)
    if payload["kind"] == "profile":
        return _profile_case(payload)
    return _attention_case(payload)


# ----------------------------------------------------------------------------- orchestration
def _fmt_bytes(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


class _Runner:
    def __init__(self, args: argparse.Namespace, total: int) -> None:
        self.args, self.total, self.done = args, total, 0

    def __call__(self, payload: dict[str, Any], hard_timeout: float) -> dict[str, Any]:
        load = gsa_common.load_average()
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
        if not self.args.quiet:
            print(f"[{self.done:3d}/{self.total}] {text}", file=sys.stderr, flush=True)


def _base_payload(args: argparse.Namespace) -> dict[str, Any]:
    return {"heads": args.heads, "dim": args.head_dim, "seed": args.seed, "threads": args.threads,
            "warmup": args.warmup, "repeats": args.repeats, "max_case_s": args.max_case_seconds}


def run_attention_cases(args: argparse.Namespace, series: list[Series], runner: _Runner) -> list[dict[str, Any]]:
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
                _add_flops(row, args)
                results.append(row)
                if row["status"] in ("stopped", "killed", "error"):
                    why = row.get("reason") or row["status"]
                    stopped[(s.label, mode)] = ("skipped", f"not run: stopped at n={n} ({why})")
                elif row["status"] == "unavailable":
                    stopped[(s.label, mode)] = ("unavailable", row["reason"])
                runner.log(f"n={n:6d} {s.label:22s} {mode:8s} {row['status']:11s} "
                           f"{_fmt_s(row.get('median_s')):>10s}  peak {_fmt_bytes(row.get('peak_bytes'))}"
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
                       + (f"{row['step_ms_median']:.3f} ms/token  state {_fmt_bytes(row['state_bytes'])}"
                          if row["status"] == "ok" else str(row.get("reason"))))
    return results


def _add_flops(row: dict[str, Any], args: argparse.Namespace) -> None:
    n, h, d = row["n"], args.heads, args.head_dim
    if row["backend"] == SDPA:
        flops = sdpa_flops(n, h, d)
    elif row["backend"] == "kernel":
        chunk = (row.get("backend_info") or {}).get("chunk_size") or (row.get("params") or {}).get("chunk_size", 64)
        flops = kernel_flops(n, h, d, row["splats"], chunk)
    elif row["backend"] == "sparse":
        flops = sparse_flops(n, h, d, row["splats"], row["params"]["top_k"],
                             row["params"].get("scan_block", 64))
    else:
        flops = None
    if flops is not None and row["mode"] == "fwd+bwd":
        flops *= 3
    row["flops"] = flops


def _summaries(report: dict[str, Any]) -> None:
    """Fill in GFLOP/s, matmul fractions, speed ratios and the target verdicts."""
    rate = report["matmul"]["gflops_reference"]
    timed = [r for r in report["results"] if r.get("median_s")]
    for r in timed:
        if r.get("flops"):
            r["gflops"] = r["flops"] / r["median_s"] / 1e9
            r["fraction_of_matmul"] = r["gflops"] / rate
    sdpa = {(r["n"], r["mode"]): r for r in timed if r["backend"] == SDPA}
    ratios = []
    for r in timed:
        ref = sdpa.get((r["n"], r["mode"]))
        if r["backend"] == SDPA or ref is None:
            continue
        ratios.append({"series": r["series"], "n": r["n"], "mode": r["mode"], "sdpa_s": ref["median_s"],
                       "gsa_s": r["median_s"], "speedup_vs_sdpa": ref["median_s"] / r["median_s"],
                       "sdpa_single_cold_call": bool(ref.get("cold"))})
    report["ratios"] = ratios
    report["targets"] = evaluate_targets(report)


def _kernel_label(report: dict[str, Any]) -> str:
    return f"kernel K={report['settings']['splats']}"


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and ``met`` (None when not measured)."""
    label = _kernel_label(report)
    speed = {(r["n"], r["mode"]): r["speedup_vs_sdpa"] for r in report.get("ratios", []) if r["series"] == label}
    targets = []
    for n, want in ((2048, 1.0), (16384, 10.0), (32768, 20.0)):
        got = speed.get((n, "fwd"))
        targets.append({"target": f"kernel forward >= {want:g}x SDPA at n={n}", "threshold": want,
                        "measured": got, "met": None if got is None else got >= want})
    fractions = {r["n"]: r.get("fraction_of_matmul") for r in report["results"]
                 if r["series"] == label and r["mode"] == "fwd" and r["n"] >= 8192 and r.get("median_s")}
    known = [f for f in fractions.values() if f is not None]
    worst = min(known) if known else None
    targets.append({"target": "kernel forward >= 40% of measured matmul FLOP rate for n >= 8192",
                    "threshold": 0.40, "measured": worst, "per_n": fractions,
                    "met": None if worst is None else worst >= 0.40})
    steps = {r["context"]: r["step_ms_median"] for r in report.get("decode", [])
             if r["series"] == label and r.get("status") == "ok"}
    flat = None
    if len(steps) >= 2:
        flat = max(steps.values()) / min(steps.values()) - 1.0
    span = f"{min(steps)} to {max(steps)}" if steps else "1k to 64k"
    targets.append({"target": f"decode time per token flat within 10% from context {span}",
                    "threshold": 0.10, "measured": flat, "per_context_ms": steps,
                    "contexts": sorted(steps), "met": None if flat is None else flat <= 0.10})
    states = {r["context"]: r.get("state_bytes") for r in report.get("decode", [])
              if r["series"] == label and r.get("status") == "ok"}
    if states:
        const = len(set(states.values())) == 1
        targets.append({"target": "recurrent state size independent of context", "threshold": None,
                        "measured": states, "met": const})
    return targets


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    series = build_series(args)
    n_attn = len(args.sizes) * len(series) * (1 if args.no_backward else 2)
    n_dec = 0 if args.no_decode else 2 * len(args.decode_contexts)
    runner = _Runner(args, n_attn + n_dec + len(args.profile_sizes))
    started = gsa_common.utc_now()
    load_start = gsa_common.load_average()
    matmul_start = timing.matmul_gflops(args.matmul_size)
    if not args.quiet:
        print(f"matmul: {matmul_start['gflops_best']:.1f} GFLOP/s fp32 ({args.threads} threads)", file=sys.stderr)
    from gsa_core.registry import get_registry

    registered = get_registry().names("backend")
    attention = run_attention_cases(args, series, runner)
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
        "started_at": started,
        "finished_at": gsa_common.utc_now(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
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
        "loadavg_1m": {"start": load_start, "end": gsa_common.load_average(),
                       "note": "system load average; above ~0.5 on this machine other processes competed for "
                       "the cores and timings are inflated"},
        "environment": timing.environment(),
        "matmul": matmul,
        "peak_memory_method": timing.memory_method() if args.isolate else
        timing.memory_method() + " [NOTE: this run used --no-isolate, so cases shared one process]",
        "flop_formulas": FLOP_FORMULAS,
        "results": attention,
        "decode": decode,
        "profile": profiles,
        "profile_note": "torch.profiler (CPU) of one kernel-backend forward after a warm-up; self CPU time "
        "per op, summed over both threads' work as the profiler attributes it",
    }
    _summaries(report)
    return report


# ----------------------------------------------------------------------------- reporting
def _index(report: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(r["series"], r["n"], r["mode"]): r for r in report["results"]}


def _cell_time(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    if not r.get("median_s"):
        return {"skipped": "stopped", "unavailable": "n/a"}.get(r.get("status", ""), r.get("status", "–"))
    ms = r["median_s"] * 1e3
    text = f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"
    return text + (" (1 call, stopped)" if r.get("status") == "stopped" else "")


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not (a and b and a.get("median_s") and b.get("median_s")):
        return "–"
    return f"{a['median_s'] / b['median_s']:.2f}×"


def markdown_table(report: dict[str, Any]) -> str:
    """README tables: SDPA vs kernel, sparse variants, decode, and the targets."""
    idx = _index(report)
    st = report["settings"]
    env = report["environment"]
    rate = report["matmul"]["gflops_reference"]
    kernel = _kernel_label(report)
    modes = st["modes"]
    sparse = [s["label"] for s in st["series"] if s["backend"] == "sparse"]
    others = [s["label"] for s in st["series"] if s["backend"] not in (SDPA, "kernel", "sparse")]
    lines = [
        f"Causal attention, fp32, batch 1, H={st['heads']}, d={st['head_dim']}, K={st['splats']}; "
        f"{env.get('cpu_model')} ({st['threads']} threads), torch {env.get('torch')}; "
        f"measured fp32 matmul rate {rate:.0f} GFLOP/s. Times in ms (median).",
        "",
    ]
    head = ["n", "SDPA fwd", "kernel fwd", "speed-up", "kernel GFLOP/s (% matmul)"]
    if "fwd+bwd" in modes:
        head += ["SDPA fwd+bwd", "kernel fwd+bwd", "speed-up", "peak mem fwd+bwd SDPA / kernel"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in st["sizes"]:
        s_f, k_f = idx.get((SDPA, n, "fwd")), idx.get((kernel, n, "fwd"))
        gf = "–"
        if k_f and k_f.get("gflops"):
            gf = f"{k_f['gflops']:.1f} ({100 * k_f['fraction_of_matmul']:.0f}%)"
        cells = [str(n), _cell_time(s_f), _cell_time(k_f), _ratio(s_f, k_f), gf]
        if "fwd+bwd" in modes:
            s_b, k_b = idx.get((SDPA, n, "fwd+bwd")), idx.get((kernel, n, "fwd+bwd"))
            mem = f"{_fmt_bytes((s_b or {}).get('peak_bytes'))} / {_fmt_bytes((k_b or {}).get('peak_bytes'))}"
            cells += [_cell_time(s_b), _cell_time(k_b), _ratio(s_b, k_b), mem]
        lines.append("| " + " | ".join(cells) + " |")
    extra = sparse + others
    if extra:
        lines += ["", "Other GSA backends, ms (forward / forward+backward):", ""]
        lines += ["| n | " + " | ".join(extra) + " |", "|---|" + "---|" * len(extra)]
        for n in st["sizes"]:
            cells = [str(n)]
            for label in extra:
                f = _cell_time(idx.get((label, n, "fwd")))
                cells.append(f"{f} / {_cell_time(idx.get((label, n, 'fwd+bwd')))}" if "fwd+bwd" in modes else f)
            lines.append("| " + " | ".join(cells) + " |")
    decode = report.get("decode") or []
    if decode:
        by = {(r["series"], r["context"]): r for r in decode}
        lines += ["", "Decoding one token after a prefilled context:", "",
                  "| context | kernel ms/token | kernel state | SDPA + KV cache ms/token | KV cache |",
                  "|---|---|---|---|---|"]
        for ctx in st["decode_contexts"]:
            k_r, s_r = by.get((kernel, ctx), {}), by.get(("sdpa + KV cache", ctx), {})

            def ms(r: dict[str, Any]) -> str:
                return f"{r['step_ms_median']:.3f}" if r.get("status") == "ok" else r.get("status", "–")

            lines.append(f"| {ctx} | {ms(k_r)} | {_fmt_bytes(k_r.get('state_bytes'))} | {ms(s_r)} | "
                         f"{_fmt_bytes(s_r.get('state_bytes'))} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in report.get("targets", []):
        lines.append(f"| {t['target']} | {_fmt_measured(t)} | "
                     f"{'–' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
    return "\n".join(lines) + "\n"


def _fmt_measured(t: dict[str, Any]) -> str:
    m = t["measured"]
    if m is None:
        return "not measured"
    if isinstance(m, dict):
        return ", ".join(f"{k}: {_fmt_bytes(v)}" for k, v in m.items()) if m else "–"
    if "x SDPA" in t["target"]:
        return f"{m:.2f}×"
    if "%" in t["target"] and "matmul" in t["target"]:
        per = ", ".join(f"n={n}: {100 * f:.0f}%" for n, f in t.get("per_n", {}).items() if f is not None)
        return f"{100 * m:.0f}% (worst; {per})"
    if "flat" in t["target"]:
        return f"max/min − 1 = {100 * m:.1f}%"
    return str(m)


def plot(report: dict[str, Any], path: Path) -> None:
    """Log-log time vs n for forward and forward+backward, and decode ms/token vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = report["settings"]
    modes = st["modes"]
    panels = [*modes, "decode"] if report.get("decode") else list(modes)
    palette = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                    "tab:olive", "tab:cyan"])
    colors = {SDPA: "black", "sdpa + KV cache": "black"}
    for s in st["series"]:
        colors.setdefault(s["label"], next(palette, "tab:gray"))

    def style(label: str) -> dict[str, Any]:
        return {"color": colors.get(label, "tab:gray"), "linestyle": "--" if label.startswith(SDPA) else "-"}

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    labels = [s["label"] for s in st["series"]]
    for ax, mode in zip(axes[0], panels, strict=True):
        if mode == "decode":
            series = sorted({r["series"] for r in report["decode"]})
            for label in series:
                pts = sorted((r["context"], r["step_ms_median"]) for r in report["decode"]
                             if r["series"] == label and r.get("status") == "ok")
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label, **style(label))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("ms per decoded token")
            ax.set_title("decode, one token after prefill")
        else:
            for label in labels:
                rows = [r for r in report["results"]
                        if r["series"] == label and r["mode"] == mode and r.get("median_s")]
                pts = sorted((r["n"], r["median_s"]) for r in rows)
                if not pts:
                    continue
                ax.plot(*zip(*pts, strict=True), marker="o", label=label, **style(label))
                for r in rows:
                    if r.get("status") == "stopped":
                        ax.plot([r["n"]], [r["median_s"]], marker="x", markersize=12, color=style(label)["color"])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n")
            ax.set_ylabel("seconds (median)")
            ax.set_title(f"causal attention, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"GSA vs SDPA — H={st['heads']} d={st['head_dim']} K={st['splats']} fp32, "
                 f"{env.get('cpu_model')} × {st['threads']} threads, torch {env.get('torch')} "
                 f"(x: one call over the limit, stopped)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "attention.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    png_path: Path | None = out_dir / "attention.png"
    try:
        plot(report, png_path)
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written", file=sys.stderr)
        png_path = None
    return json_path, png_path


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gsa bench attention`` / ``python -m gsa_bench.attention``."""
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="sequence lengths: '512,1024', '1k,64k' or a power-of-two range '512-65536' "
                        "(default 512-65536; --quick: 256,512,1024)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, about a minute: small sizes and contexts, fewer repeats")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="output folder for attention.json and attention.png (default benchmarks/results/)")
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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
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
    parser.add_argument("--markdown", action="store_true", help="print the README tables (markdown)")
    parser.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                        help="do not measure: re-render tables and plot from an existing attention.json")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(handler=run)


def _apply_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.isolate is None:
        args.isolate = not quick
    if args.sizes is None:
        args.sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    if args.decode_contexts is None:
        args.decode_contexts = QUICK_CONTEXTS if quick else DEFAULT_CONTEXTS
    if args.decode_steps is None:
        args.decode_steps = 50 if quick else 300
    if args.repeats is None:
        args.repeats = 3 if quick else 5
    if args.max_case_seconds is None:
        args.max_case_seconds = 5.0 if quick else 60.0
    if args.sparse is None:
        args.sparse = parse_sparse(DEFAULT_SPARSE)
    if args.profile_sizes is None:
        args.profile_sizes = [] if quick else [2048, 16384]
    if args.memory_limit is None:
        total = timing.mem_total_bytes()
        args.memory_limit = round(total / 2 / 2**30, 1) if total else 8.0
    for label in ("heads", "head_dim", "splats", "repeats", "decode_steps"):
        if getattr(args, label) < 1:
            raise SystemExit(f"--{label.replace('_', '-')} must be >= 1")


def run(args: argparse.Namespace) -> int:
    """Measure (or load ``--from-json``), write JSON and PNG to ``--out``, print the summary."""
    _apply_defaults(args)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        if args.out.resolve() != args.from_json.parent.resolve():
            write_outputs(report, args.out)
        else:
            plot(report, args.out / "attention.png")
    else:
        report = run_benchmark(args)
        json_path, png_path = write_outputs(report, args.out)
        if not args.quiet:
            print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""), file=sys.stderr)
    print(markdown_table(report) if args.markdown else summary_text(report))
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsa_bench.attention", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
