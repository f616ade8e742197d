"""FLOP accounting of the attention benchmark: SDPA's count, each GSA backend's own count, and the rate.

A GSA backend reports its count through its optional ``flops(batch, heads, n_q, n_k, head_dim, value_dim,
causal, bank)`` method (measured in the worker, ``attention_cases.backend_flops``), so a new backend needs
no edit here; one without it is timed as usual and gets no GFLOP/s.
"""

from __future__ import annotations

from typing import Any

from gsa_bench.attention_cases import SDPA

FLOP_FORMULAS = {
    "sdpa_fwd": "2 matmuls (QK^T, PV) over the causal triangle: 2 * 2*d * n(n+1)/2 * H = 2*d*H*n*(n+1)",
    "fwd+bwd": "3 x the forward count (convention: backward does about twice the forward's matmul work); "
    "only used for the fwd+bwd GFLOP/s column; train_fwd_gflops: the forward count over the forward part of "
    "the fwd+bwd call (autograd recording: training mode)",
    "gsa_backends": "each backend's own count from its flops(batch, heads, n_q, n_k, head_dim, value_dim, causal, "
    "bank) method: matmul-equivalent work of one forward, elementwise passes (exp, log, max, rescaling) not "
    "counted, so the fraction of the matmul rate counts useful matmul work only; what each one counts is its "
    "docstring, in flop_methods. A backend without the method gets no FLOP figures",
}


def sdpa_flops(n: int, heads: int, dim: int, batch: int = 1) -> float:
    return 2.0 * dim * heads * n * (n + 1) * batch


def add_flops(row: dict[str, Any], heads: int, head_dim: int, methods: dict[str, str]) -> None:
    """``row["flops"]`` of one measured case (None when its backend reports none); collects each backend's
    description of its count into ``methods``."""
    doc = row.pop("flops_doc", None)
    if doc:
        methods.setdefault(row["backend"], doc)
    fwd = sdpa_flops(row["n"], heads, head_dim) if row["backend"] == SDPA else row.pop("flops_fwd", None)
    row["flops"] = None if fwd is None else fwd * (3 if row["mode"] == "fwd+bwd" else 1)


def add_rates(report: dict[str, Any]) -> None:
    """GFLOP/s and the fraction of the machine's measured matmul rate of every timed case with a count."""
    rate = report["matmul"]["gflops_reference"]
    for r in report["results"]:
        if r.get("median_s") and r.get("flops"):
            r["gflops"] = r["flops"] / r["median_s"] / 1e9
            r["fraction_of_matmul"] = r["gflops"] / rate
        if r.get("train_fwd_median_s") and r.get("flops"):  # the forward of a fwd+bwd call: 1/3 of its count
            r["train_fwd_gflops"] = r["flops"] / 3 / r["train_fwd_median_s"] / 1e9
            r["train_fwd_fraction_of_matmul"] = r["train_fwd_gflops"] / rate
