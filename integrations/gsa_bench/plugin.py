"""The built-in benchmarks, registered for ``gsa bench NAME`` through the ``gsa.plugins`` entry point.

Each target is the module's ``BENCHMARK`` (a :class:`gsa_bench.scaffold.Benchmark`), imported only when
that benchmark runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gsa_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from gsa_core.commands import CommandSet

BENCHMARKS: dict[str, str] = {
    "attention": "backends vs PyTorch SDPA: time, memory, FLOP rate, decode per token",
    "init": "initializers on the real MiniLM: attention error before training, coverage, time",
    "adaptation": "adaptation on vs off on the synthetic shift task",
    "decode": "generation: tokens/s and cache memory vs context, softmax KV cache vs GSA recurrent cache",
    "longctx": "generate() on 4k-64k prompts: peak RSS, time to first token, prefill and decode speed, GSA vs softmax",
    "distill_bert": "conversion quality on the real MiniLM: sentence-embedding cosine and neighbour agreement",
    "distill_causal": "conversion quality on a reference GPT-Neo: held-out perplexity ratio, GSA from scratch",
    "serve": "gsa serve under 1-64 streaming clients: tokens/s, TTFT, ITL, memory per session, prefix-cache TTFT",
    "batch_step": "serving's batched decode step in one process: ms per step and tokens/s against rows, GSA vs softmax",
}


@hookimpl
def gsa_register_commands(cli: CommandSet) -> None:
    for name, help_text in BENCHMARKS.items():
        cli.benchmark(name, f"gsa_bench.{name}:BENCHMARK", help=help_text)
