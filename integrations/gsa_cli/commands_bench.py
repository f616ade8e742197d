"""``gsa bench NAME``: each benchmark module under ``gsa_bench`` provides ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "attention": "backends vs PyTorch SDPA: time, memory, FLOP rate, decode per token",
    "init": "initializers on the real MiniLM: attention error before training, coverage, time",
    "adaptation": "adaptation on vs off on the synthetic shift task",
    "decode": "generation: tokens/s and cache memory vs context, softmax KV cache vs GSA recurrent cache",
    "distill_bert": "conversion quality on the real MiniLM: sentence-embedding cosine and neighbour agreement",
    "distill_causal": "conversion quality on a reference GPT-Neo: held-out perplexity ratio, GSA from scratch",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"gsa_bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name not in ("gsa_bench", f"gsa_bench.{name}"):  # a missing dependency is a real error
                raise
            continue
        bench = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().split("\n")[0])
        module.add_arguments(bench)
        bench.set_defaults(handler=module.run)
