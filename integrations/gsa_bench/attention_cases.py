"""The attention benchmark's cases, run in a worker process: one timed forward (and backward), one decode
run after a prefill, one profiled forward. Each takes a JSON payload and returns a JSON object
(``gsa_bench.timing.run_isolated`` runs them in a fresh process so memory readings stay honest).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import statistics
import time
from pathlib import Path
from typing import Any

from gsa_bench import timing

SDPA = "sdpa"
CASE_TARGET = "gsa_bench.attention_cases:run_case"


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

    train_fwd: list[float] = []  # fwd+bwd: the forward alone, with autograd recording (training mode)
    if mode == "fwd":
        def call() -> None:
            with torch.no_grad():
                forward()
    else:
        for t in (q, k, v):
            t.requires_grad_(True)
        grad_out = torch.randn(1, heads, n, dim, generator=gen)

        def call() -> None:
            start = time.perf_counter()
            out = forward()
            train_fwd.append(time.perf_counter() - start)
            out.backward(grad_out)
            for t in leaves:
                t.grad = None

    m = timing.measure(call, warmup=p["warmup"], repeats=p["repeats"], budget_s=p["limit_s"],
                       max_total_s=p["max_case_s"])
    result = {"status": "stopped" if m.stopped else "ok", **m.to_dict(), "backend_info": info,
              "backend_source": None, "input_bytes": 3 * n * heads * dim * 4}
    if train_fwd:
        timed = train_fwd[len(m.warmup_s):] or train_fwd
        result.update(train_fwd_times_s=timed, train_fwd_median_s=statistics.median(timed),
                      grad_bytes=sum(t.numel() * t.element_size() for t in leaves))
    if p["backend"] != SDPA:
        result.update(backend_source=source_fingerprint(backend), **backend_flops(backend, heads, n, dim, bank))
    return result


def backend_flops(backend: Any, heads: int, n: int, dim: int, bank: Any) -> dict[str, Any]:
    """The backend's own FLOP count of one causal forward (its optional ``flops`` method) and what it counts
    (the method's docstring); ``None`` when it has no such method, so a new backend needs no benchmark edit."""
    count = getattr(backend, "flops", None)
    if not callable(count):
        return {"flops_fwd": None, "flops_doc": None}
    return {"flops_fwd": float(count(1, heads, n, n, dim, dim, True, bank)),
            "flops_doc": " ".join((inspect.getdoc(count) or "").split()) or None}


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

