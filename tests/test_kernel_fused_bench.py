"""The attention benchmark's issue-16 bookkeeping: the training-mode forward inside fwd+bwd, the gradient buffers,
and the targets computed from them (no timing is asserted, only what is recorded and derived)."""

from __future__ import annotations

from gsa_bench.attention_cases import run_case
from gsa_bench.attention_report import MATMUL_SHARE_TARGET, MEMORY_TARGET_N, evaluate_targets, summarise


def test_fwd_bwd_case_records_the_training_forward_and_gradient_bytes() -> None:
    payload = {"kind": "attention", "backend": "kernel", "splats": 4, "params": {}, "n": 32, "mode": "fwd+bwd",
               "heads": 2, "dim": 8, "seed": 0, "threads": 1, "warmup": 1, "repeats": 2, "max_case_s": 5.0,
               "limit_s": 30.0}
    row = run_case(payload)
    assert row["status"] == "ok"
    assert len(row["train_fwd_times_s"]) == len(row["times_s"]) == 2  # the warm-up call's forward is dropped
    assert 0 < row["train_fwd_median_s"] <= row["median_s"]
    # q, k, v [1, 2, 32, 8] and the bank's centers [2, 4, 8], log_amplitude [2, 4], log_scale [2, 4, 8], fp32
    assert row["grad_bytes"] == 4 * (3 * 2 * 32 * 8 + 2 * 4 * 8 + 2 * 4 + 2 * 4 * 8)


def _report(peaks: dict[str, int], grads: int, train_s: float) -> dict:
    rows = []
    for series, backend in (("sdpa", "sdpa"), ("kernel K=64", "kernel")):
        for n in (8192, MEMORY_TARGET_N):
            rows.append({"series": series, "backend": backend, "n": n, "mode": "fwd+bwd", "median_s": 1.0,
                         "flops": 3e9, "peak_bytes": peaks[backend], "grad_bytes": grads,
                         **({"train_fwd_median_s": train_s} if backend == "kernel" else {})})
    return {"settings": {"splats": 64}, "matmul": {"gflops_reference": 10.0}, "results": rows, "decode": []}


def test_targets_from_the_training_forward_and_memory() -> None:
    # kernel: 1e9 forward FLOPs in 0.2 s = 5 GFLOP/s = 50% of 10; memory 300 vs 1000 MiB with 250 MiB of gradients
    report = _report({"sdpa": 1000 << 20, "kernel": 300 << 20}, 250 << 20, 0.2)
    summarise(report)
    by = {t["target"]: t for t in evaluate_targets(report)}
    train = next(t for name, t in by.items() if "training" in name)
    assert abs(train["measured"] - 0.5) < 1e-12 and train["met"] is (MATMUL_SHARE_TARGET <= 0.5)
    memory = next(t for name, t in by.items() if "peak memory" in name)
    assert abs(memory["measured"] - 0.3) < 1e-12 and memory["met"] is False
    assert abs(memory["without_gradient_buffers"] - 50 / 750) < 1e-12
    inference = next(t for name, t in by.items() if "inference" in name)
    assert inference["measured"] is None and inference["met"] is None  # no fwd rows: not measured
