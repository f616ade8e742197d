"""Serving's batched decode step in one process: ms per step and tokens/s against rows, GSA vs softmax.

What ``gsa bench serve`` cannot separate: how much of its aggregate tokens/s the batched forward itself
allows. Here the serving engine's own :class:`gsa_serve.batch.Batch` (stacked pasts, one forward per
step) decodes ``rows`` sessions at once, each prefilled with the same number of prompt tokens, with no
HTTP, no arriving requests and no prefills between steps, on the same model shape and thread count as
the serve benchmark's servers. ``rows x tokens/s(1 row)`` would be perfect batching; the ratio at 16
rows is the ceiling of the serve benchmark's batching target.

Run: ``gsa bench batch_step [--quick] [--out DIR]`` or ``python -m gsa_bench.batch_step``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from gsa_bench.args import csv_list, int_list
from gsa_bench.scaffold import Benchmark, Run, log, quick_defaults
from gsa_bench.serve import QUICK_SHAPE, SHAPE

SCHEMA = "gsa-bench-batch-step/1"
MODELS = ("gsa", "softmax")
#: --option: (quick, full) defaults
DEFAULTS = {"rows": ([1, 4], [1, 4, 16, 64]), "prompt_tokens": (16, 128), "steps": (3, 10), "vocab": (512, 16384)}


def build(kind: str, args: argparse.Namespace) -> Any:
    """The serve benchmark's model (random weights), softmax or converted, and its serving runner."""
    import torch
    from gsa_serve.runners import runner_for
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gsa_plugins.adapters import convert

    torch.manual_seed(args.seed)
    config = GPTNeoConfig(**(QUICK_SHAPE if args.quick else SHAPE), vocab_size=args.vocab,
                          max_position_embeddings=args.prompt_tokens + args.steps + 8, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, attn_implementation="eager")
    model = GPTNeoForCausalLM(config).eval()
    if kind == "gsa":
        convert(model, {"bank": {"n_splats": args.splats}, "backend": "kernel", "initializer": "random",
                        "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}})
    return runner_for(model)


def time_rows(runner: Any, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill ``rows`` sessions into one batch, then time ``args.steps`` batched decode steps."""
    import torch
    from gsa_serve.batch import Batch, prefill

    batch = Batch(runner)
    prompt = [3 + (i % (args.vocab - 3)) for i in range(args.prompt_tokens)]
    with torch.no_grad():
        for _ in range(rows):
            batch.add(prefill(runner, None, prompt)[1])
        for _ in range(args.warmup):
            batch.step([5] * rows)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            batch.step([5] * rows)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"rows": rows, "step_times_s": times, "median_step_s": median, "tokens_per_s": rows / median,
            "past_bytes": batch.nbytes()}


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    cases = []
    for kind in args.models:
        runner = build(kind, args)
        for rows in args.rows:
            case = {"model": kind, **time_rows(runner, rows, args)}
            log(args, f"{kind:8s} rows {rows:3d}: {1000 * case['median_step_s']:8.1f} ms/step "
                      f"{case['tokens_per_s']:8.1f} tok/s")
            cases.append(case)
            run.save({"schema": SCHEMA, "cases": cases, "summary": summarise(cases)})  # partial results
    return {"schema": SCHEMA, "what": __doc__.split("\n\n")[0],
            "settings": {"shape": QUICK_SHAPE if args.quick else SHAPE, "vocab": args.vocab, "rows": args.rows,
                         "prompt_tokens": args.prompt_tokens, "steps": args.steps, "warmup": args.warmup,
                         "splats": args.splats, "threads": args.threads, "models": args.models, "seed": args.seed},
            "method": "per row count: the rows prefilled one by one and added to one Batch, warm-up steps, then "
                      "timed Batch.step calls (time.perf_counter), median reported; tokens/s = rows / median",
            "cases": cases, "summary": summarise(cases)}


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: tokens/s at each row count over tokens/s at one row (perfect batching: the row count)."""
    out: dict[str, Any] = {}
    for kind in MODELS:
        mine = {c["rows"]: c for c in cases if c["model"] == kind}
        if 1 in mine:
            out[kind] = {str(r): c["tokens_per_s"] / mine[1]["tokens_per_s"] for r, c in sorted(mine.items())}
    return {"speedup_over_one_row": out}


def markdown(report: dict[str, Any]) -> str:
    speedups = report["summary"]["speedup_over_one_row"]
    lines = ["| model | rows | ms per step | tokens/s | over 1 row | stacked past |", "|---|---:|---:|---:|---:|---:|"]
    for c in report["cases"]:
        ratio = speedups.get(c["model"], {}).get(str(c["rows"]))
        lines.append(f"| {c['model']} | {c['rows']} | {1000 * c['median_step_s']:.1f} | {c['tokens_per_s']:.1f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {c['past_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines)


def prepare(args: argparse.Namespace) -> None:
    from gsa_core.errors import GSAError

    quick_defaults(args, DEFAULTS)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise GSAError(f"--models {','.join(args.models)}: choose from {', '.join(MODELS)}")
    for name in ("prompt_tokens", "steps", "splats"):
        if getattr(args, name) < 1:
            raise GSAError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.vocab < 8:
        raise GSAError("--warmup must be at least 0 and --vocab at least 8")


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int_list(1), default=None, help="sessions per batch (default 1,4,16,64)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens prefilled per session (default 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per row count (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default 3)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 16384, as gsa bench serve)")
    parser.add_argument("--splats", type=int, default=64, help="splats per head of the GSA layers (default 64)")
    parser.add_argument("--models", type=csv_list, default=list(MODELS), help="which models (default gsa,softmax)")
    parser.add_argument("--seed", type=int, default=0)


BENCHMARK = Benchmark("batch_step", __doc__.split("\n\n")[0], options, measure, markdown=markdown,
                      prepare=prepare, threads=1,
                      quick_help="smoke run: a tiny model, 1 and 4 rows, 16 prompt tokens, 3 steps")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
