"""Reusable measuring pieces: a timer with a per-call budget, peak memory, matmul rate, environment.

Peak memory (CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``): before a
call, free memory is handed back to the OS (``gc.collect`` + glibc ``malloc_trim(0)``), the kernel's
resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the
current RSS read; after the call the high-water mark (``VmHWM``) is read. The difference is the peak
resident memory the call added on top of what was already resident (inputs, parameters, libraries):
tensors, autograd's saved tensors, allocator slack and library scratch, at page granularity. Run
each case in a fresh process (:func:`run_isolated`) so that earlier cases leave no cached memory
behind. Where ``clear_refs`` is unavailable it falls back to ``ru_maxrss`` minus the RSS before the
call, which is only meaningful when the call raises the process's all-time peak (flagged).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gsa_common import utc_now

RESULT_MARKER = "GSA_BENCH_RESULT "

PEAK_MEMORY_METHOD = (
    "peak_bytes = VmHWM after the call minus VmRSS just before it, with the high-water mark reset "
    "(echo 5 > /proc/self/clear_refs) and free heap returned to the OS (gc.collect + malloc_trim(0)) "
    "before the call; each case runs in a fresh Python process, so this is the resident memory the "
    "call itself added (temporaries, autograd's saved tensors, allocator slack, library scratch), "
    "excluding inputs and parameters that existed before it; page granularity; max over measured calls"
)
PEAK_MEMORY_FALLBACK = (
    "fallback: ru_maxrss after the call minus VmRSS before it (clear_refs unavailable); only "
    "meaningful when the call raised the process's all-time peak"
)


# ----------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


_LIBC: Any = None


def release_free_memory() -> None:
    """Collect garbage and hand free heap memory back to the OS (glibc only; a no-op elsewhere)."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """Context manager: ``peak_bytes`` added by the enclosed code (see the module docstring)."""

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self.exact = False

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        self.exact = reset_peak_rss()
        self._before = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is None:
            return
        if self.exact:
            hwm = _status_kib("VmHWM")
            after = None if hwm is None else hwm * 1024
        else:
            after = _maxrss_bytes()
        if after is not None:
            self.peak_bytes = max(0, after - self._before)


def memory_method() -> str:
    """Which peak-memory method this process can use (for the JSON)."""
    return PEAK_MEMORY_METHOD if reset_peak_rss() else PEAK_MEMORY_FALLBACK


# ----------------------------------------------------------------------------- timing
@dataclass
class Measurement:
    """Wall-clock seconds of the measured calls (warm-up excluded) and their peak memory."""

    times_s: list[float]
    warmup_s: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)  # process CPU time (all threads) per timed call
    peak_bytes: int | None = None
    stopped: bool = False
    reason: str | None = None
    cold: bool = False  # True when the only timed call was the first (warm-up) call

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median_s": self.median_s}


def _timed_call(fn: Callable[[], Any], track_memory: bool) -> tuple[float, int | None, float]:
    mem = PeakMemory() if track_memory else contextlib.nullcontext()
    with mem:
        cpu = time.process_time()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    return elapsed, (mem.peak_bytes if isinstance(mem, PeakMemory) else None), cpu


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float | None = None,
    max_total_s: float | None = None,
    track_memory: bool = True,
) -> Measurement:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` times, and report the median.

    ``budget_s``: a call that takes longer stops the case right after it; that call's time is kept
    (``stopped=True``, with the reason), so a too-slow case costs one call. ``max_total_s``: stop
    repeating once the measured calls add up to this much (at least one measured call is kept).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    warm: list[float] = []
    for _ in range(warmup):
        elapsed, peak, cpu = _timed_call(fn, track_memory)
        warm.append(elapsed)
        if budget_s is not None and elapsed > budget_s:
            return Measurement(
                times_s=[elapsed], cpu_times_s=[cpu], peak_bytes=peak, stopped=True, cold=True,
                reason=f"one call took {elapsed:.1f} s > limit {budget_s:g} s; stopped after it (cold call)",
            )
    times: list[float] = []
    cpus: list[float] = []
    peaks: list[int] = []
    stopped, reason = False, None
    for _ in range(repeats):
        elapsed, peak, cpu = _timed_call(fn, track_memory)
        times.append(elapsed)
        cpus.append(cpu)
        if peak is not None:
            peaks.append(peak)
        if budget_s is not None and elapsed > budget_s:
            stopped, reason = True, f"one call took {elapsed:.1f} s > limit {budget_s:g} s; stopped after it"
            break
        if max_total_s is not None and sum(times) >= max_total_s:
            break
    return Measurement(times_s=times, warmup_s=warm, cpu_times_s=cpus, peak_bytes=max(peaks) if peaks else None,
                       stopped=stopped, reason=reason)


# ----------------------------------------------------------------------------- matmul rate
def matmul_gflops(size: int = 2048, repeats: int = 7) -> dict[str, Any]:
    """This machine's fp32 ``torch.mm`` rate: ``2·size³`` FLOPs per call, best and median of ``repeats``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    return {
        "what": f"torch.mm fp32 {size}x{size} @ {size}x{size}, 2*n^3 FLOPs per call, after one warm-up",
        "size": size,
        "threads": torch.get_num_threads(),
        "gflops_best": max(rates),
        "gflops_median": statistics.median(rates),
        "gflops_all": rates,
        "at": utc_now(),
    }


# ----------------------------------------------------------------------------- environment
def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def mem_total_bytes() -> int | None:
    """Total RAM in bytes (Linux), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_info(path: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    """Software and hardware facts a reader needs to compare numbers across machines."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    parallel = torch.__config__.parallel_info().splitlines()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel": [line.strip() for line in parallel if line.strip()][:8],
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_total_bytes": mem_total_bytes(),
        "git": _git_info(Path(__file__).resolve().parent),
    }


# ----------------------------------------------------------------------------- isolation
def run_isolated(target: str, payload: Mapping[str, Any], *, timeout_s: float | None = None,
                 memory_limit_bytes: int | None = None) -> dict[str, Any]:
    """Call ``module:function(payload) -> dict`` in a fresh Python process and return its dict.

    A crash, a kill (e.g. out of memory) or a timeout comes back as ``{"status": "error"|"killed",
    "reason": ...}`` instead of an exception, so one bad case never ends a benchmark run.
    ``memory_limit_bytes`` caps the address space the case may add (``RLIMIT_AS`` over what the
    process holds after importing torch): a case that needs more fails with an allocation error
    instead of waking the machine's out-of-memory killer.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    request = json.dumps({"target": target, "payload": dict(payload), "memory_limit_bytes": memory_limit_bytes})
    cmd = [sys.executable, "-c", "from gsa_bench.timing import worker_main; worker_main()"]
    try:
        proc = subprocess.run(cmd, input=request, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "killed", "reason": f"case exceeded the hard timeout of {timeout_s:g} s and was killed"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    if proc.returncode < 0:
        why = f"worker killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        why = f"worker exited with status {proc.returncode}"
    return {"status": "error", "reason": f"{why}: {tail}" if tail else why}


def call_target(target: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(dict(payload))


def _limit_address_space(extra_bytes: int) -> None:
    """Allow ``extra_bytes`` of address space beyond what this process holds with torch imported."""
    import torch  # noqa: F401 - its libraries and thread pools count towards the baseline

    size_kib = _status_kib("VmSize")
    if size_kib is None:
        return
    limit = size_kib * 1024 + extra_bytes
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker if the benchmark process dies (PR_SET_PDEATHSIG)."""
    import signal

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() == 1:  # the parent already died before prctl
            os._exit(1)


def worker_main() -> None:
    """Entry point of :func:`run_isolated`'s subprocess: request JSON on stdin, result on stdout."""
    _die_with_parent()
    request = json.loads(sys.stdin.read())
    if request.get("memory_limit_bytes"):
        _limit_address_space(int(request["memory_limit_bytes"]))
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # anything the case prints must not be mistaken for the result
    try:
        result = call_target(request["target"], request["payload"])
    except Exception as exc:  # reported to the parent as data
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        sys.stdout = real_stdout
    real_stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    real_stdout.flush()
