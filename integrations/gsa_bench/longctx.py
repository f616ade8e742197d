"""Long-context benchmark: peak memory and time of ``generate()`` on 4k-64k-token prompts, GSA vs softmax.

A GPT-Neo of the TinyStories-33M shape (hidden 768, 4 layers alternating global/local with window 256,
16 heads, vocab 50257; random weights: memory and time do not depend on their values) is built with its
2,048 trained positions, then its position table is extended to cover each prompt (``interpolate``), as a
user would with ``gsa convert --max-positions N --positions interpolate``:

- ``gsa``: converted first (global layers GSA on the ``kernel`` backend, K random splats per head; local
  layers exact), so it never holds GPT-Neo's ``n x n`` ``bias`` buffers; ``generate()`` as a user calls it:
  the recurrent cache and the automatic chunked prefill (``long_context.prefill_chunk``);
- ``softmax``: the original (its ``bias`` buffers rebuilt at the new size, ``layers x n^2`` bytes),
  ``generate()`` with transformers' own chunked prefill (``prefill_chunk_size``, the same chunk) and its
  ``DynamicCache``. A case whose lower bound of memory (bias buffers, keys and values, one chunk's scores)
  exceeds what the machine has is recorded as skipped with that reason instead of run.

Each (model, prompt) case runs in a fresh process (``gsa_bench.timing.run_isolated``) and records the
process's peak RSS during ``generate()`` (the kernel's high-water mark, reset before it), the O(n) terms
that the memory target excludes (token ids, the mask, the output sequence, the position table), time
to first token, prefill tokens/s (prompt tokens / time to first token), decode ms/token, the cache's
bytes, CPU time, the load average and the thread count. Writes ``longctx.json``, ``longctx.md`` and
``longctx.png``.

Run: ``gsa bench longctx [--quick] [--out DIR]`` or ``python -m gsa_bench.longctx``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

import gsa_common

from gsa_bench import timing
from gsa_bench.args import parse_sizes
from gsa_bench.scaffold import Benchmark, Run, log, ok_cases, ok_series, pyplot, quick_defaults

SCHEMA = "gsa-bench-longctx/1"
CASE_TARGET = "gsa_bench.longctx:run_case"
MODELS = ("gsa", "softmax")
#: roneneldan/TinyStories-33M's shape and trained positions.
TINYSTORIES = {"vocab_size": 50257, "hidden_size": 768, "num_layers": 4, "num_heads": 16, "window_size": 256,
               "attention_types": [[["global", "local"], 2]], "max_position_embeddings": 2048}
QUICK_SHAPE = {"vocab_size": 101, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "window_size": 4,
               "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 64}
DEFAULT_CONTEXTS = [4096, 16384, 65536]
QUICK_CONTEXTS = [256, 1024, 4096]
TARGETS = {
    "peak_rss_ratio": 1.5,  # GSA peak RSS at the largest prompt / at the smallest, O(n) terms excluded
    "prefill_time_ratio": 20.0,  # GSA time to first token at 64k / at 4k (16x the tokens)
}


# ----------------------------------------------------------------------------- models
def gsa_config(splats: int) -> dict[str, Any]:
    return {"bank": {"n_splats": splats}, "backend": "kernel", "initializer": "random",
            "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}}


def positions_for(context: int, new_tokens: int) -> int:
    """The position table a case needs: the prompt, the new tokens and a margin, at least the trained 2,048."""
    return context + new_tokens + 8


def softmax_bytes_lower_bound(shape: dict[str, Any], context: int, chunk: int, positions: int) -> int:
    """What the softmax model must hold at least: GPT-Neo's bool ``bias`` (``layers x P^2``), fp32 keys and
    values of every token in every layer, and one chunk's fp32 scores against every key (one layer)."""
    layers, hidden, heads = shape["num_layers"], shape["hidden_size"], shape["num_heads"]
    return layers * positions**2 + 2 * layers * context * hidden * 4 + heads * min(chunk, context) * context * 4


def build_model(kind: str, settings: dict[str, Any], context: int) -> Any:
    """The case's model with seeded random weights and a position table extended to cover the prompt."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gsa_plugins.adapters import convert
    from gsa_plugins.adapters.long_inputs import set_prefill_chunk
    from gsa_plugins.adapters.positions import extend_positions

    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; valid models: {', '.join(MODELS)}")
    torch.manual_seed(settings["seed"])
    config = GPTNeoConfig(**settings["shape"], attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = GPTNeoForCausalLM(config).eval()
    if kind == "gsa":
        convert(model, settings["gsa_config"])  # before extending: the converted model holds no bias buffers
        set_prefill_chunk(model, settings["prefill_chunk"])
    positions = positions_for(context, settings["new_tokens"])
    if positions > model.config.max_position_embeddings:
        extend_positions(model, positions, "interpolate")
    return model


class _Clock:
    """A ``generate()`` streamer that only records when each piece arrives (the prompt first, then each token)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        return


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size())


# ----------------------------------------------------------------------------- one case
def run_case(payload: dict[str, Any]) -> dict[str, Any]:
    """Generate ``new_tokens`` greedy tokens after a random ``context``-token prompt with one model."""
    import torch

    settings, kind, context = payload["settings"], payload["model"], int(payload["context"])
    torch.set_num_threads(settings["threads"])
    load_start = gsa_common.load_average()
    model = build_model(kind, settings, context)
    gen = torch.Generator().manual_seed(settings["seed"] + context)
    ids = torch.randint(0, settings["shape"]["vocab_size"], (1, context), generator=gen)
    mask = torch.ones_like(ids)
    new = settings["new_tokens"]
    kwargs: dict[str, Any] = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  return_dict_in_generate=True, pad_token_id=0)
    if kind == "softmax":
        kwargs["prefill_chunk_size"] = settings["prefill_chunk"]  # transformers' own chunked prefill
    clock = _Clock()
    track = bool(payload.get("track_memory", True))  # the high-water mark means something in a fresh process
    timing.release_free_memory()
    rss_before = timing.rss_bytes()
    with torch.no_grad(), (timing.PeakMemory() if track else contextlib.nullcontext()) as peak:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model.generate(ids, streamer=clock, **kwargs)
        total_s = time.perf_counter() - start
    added = peak.peak_bytes if isinstance(peak, timing.PeakMemory) else None
    first = clock.times[1] - start  # clock.times[0]: the prompt, handed over before the first forward
    decode = (clock.times[-1] - clock.times[1]) / max(1, len(clock.times) - 2)
    cache = out.past_key_values
    table = model.transformer.wpe.weight
    linear = {"input_ids": _nbytes(ids), "attention_mask": _nbytes(mask), "sequences": _nbytes(out.sequences),
              "position_table": _nbytes(table)}
    return {
        "status": "ok", "model": kind, "context": context, "new_tokens": new,
        "time_to_first_token_s": first, "prefill_tokens_per_s": context / first,
        "decode_ms_per_token": 1000 * decode, "generate_s": total_s,
        "prefill_cpu_s": clock.cpu[1] - cpu_start, "decode_cpu_ms_per_token":
            1000 * (clock.cpu[-1] - clock.cpu[1]) / max(1, len(clock.cpu) - 2),
        "peak_rss_bytes": None if added is None or rss_before is None else rss_before + added,
        "peak_added_bytes": added,
        "rss_before_generate_bytes": rss_before,
        "linear_terms_bytes": linear, "linear_total_bytes": sum(linear.values()),
        "cache_type": type(cache).__name__,
        "cache_bytes": int(cache.nbytes()) if hasattr(cache, "nbytes") else _dynamic_bytes(cache),
        "cache_kinds": [p.kind for p in cache.plans] if hasattr(cache, "plans") else None,
        "bias_buffer_bytes": sum(_nbytes(b.attn.attention.bias) for b in model.transformer.h),
        "max_position_embeddings": int(model.config.max_position_embeddings),
        "threads": torch.get_num_threads(), "loadavg_1m": {"start": load_start, "end": gsa_common.load_average()},
    }


def _dynamic_bytes(cache: Any) -> int:
    return sum(_nbytes(t) for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


# ----------------------------------------------------------------------------- the run
def prepare(args: argparse.Namespace) -> None:
    quick_defaults(args, {"contexts": (QUICK_CONTEXTS, DEFAULT_CONTEXTS), "new_tokens": (4, 16),
                          "prefill_chunk": (128, 1024)})


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "shape": dict(QUICK_SHAPE if args.quick else TINYSTORIES),
        "contexts": sorted(args.contexts),
        "new_tokens": args.new_tokens,
        "prefill_chunk": args.prefill_chunk,
        "threads": args.threads,
        "seed": args.seed,
        "models": args.models,
        "gsa_config": gsa_config(args.splats),
    }


def skip_reason(settings: dict[str, Any], context: int) -> str | None:
    """Why the softmax case is not run (its memory's lower bound does not fit this machine), or None."""
    total = timing.mem_total_bytes()
    need = softmax_bytes_lower_bound(settings["shape"], context, settings["prefill_chunk"],
                                     positions_for(context, settings["new_tokens"]))
    if total is not None and need > 0.8 * total:
        return (f"does not fit: GPT-Neo's bias buffers, every key and value and one chunk's scores need at least "
                f"{need / 2**30:.1f} GiB, more than 80% of this machine's {total / 2**30:.1f} GiB")
    return None


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    isolate = not args.no_isolate
    settings = settings_from_args(args)
    cases: list[dict[str, Any]] = []
    for context in settings["contexts"]:
        for kind in settings["models"]:
            reason = skip_reason(settings, context) if kind == "softmax" else None
            payload = {"settings": settings, "model": kind, "context": context, "track_memory": isolate}
            if reason is not None:
                result: dict[str, Any] = {"status": "skipped", "reason": reason}
            elif isolate:  # capped: a case that needs more fails with an allocation error, not the OOM killer
                total = timing.mem_total_bytes()
                result = timing.run_isolated(CASE_TARGET, payload, timeout_s=args.case_timeout,
                                             memory_limit_bytes=None if total is None else int(0.9 * total))
            else:
                result = run_case(payload)
            result.setdefault("model", kind)
            result.setdefault("context", context)
            cases.append(result)
            log(args, _case_line(result))
            run.save(_report(settings, cases, isolate))  # partial results survive a long run's interruption
    return _report(settings, cases, isolate)


def _report(settings: dict[str, Any], cases: list[dict[str, Any]], isolate: bool) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "what": "generate() on long prompts at the TinyStories-33M shape (random weights, positions extended by "
                "interpolation): the GSA conversion (recurrent cache, automatic chunked prefill) against the "
                "softmax original (DynamicCache, transformers' chunked prefill); batch 1, fp32, greedy",
        "settings": settings,
        "method": {
            "peak_rss": "the case process's RSS just before generate() plus the peak it added during generate() ("
                        + timing.PEAK_MEMORY_METHOD + "): the whole process's resident peak, libraries and "
                        "weights included",
            "linear_terms": "bytes of the O(n) tensors the memory target excludes, computed from their shapes: "
                            "prompt ids, attention mask, output sequence, and the position table (extended to "
                            "the prompt); generate() and the chunk loop also hold a few more per-token vectors",
            "time_to_first_token": "wall time from the generate() call to the first new token (a streamer's "
                                   "clock); prefill tokens/s = prompt tokens / time to first token",
            "decode": "mean wall time per token after the first new token",
            "isolation": "each case in a fresh process" if isolate else "in-process (smoke run; no peak RSS)",
            "skip": "a softmax case whose memory lower bound exceeds 80% of the machine's memory is not run",
            "prefill_target": "time to first token at the largest prompt / at the smallest <= 20 for 16x the tokens "
                              "(scaled to the token ratio of other prompt lists)",
        },
        "targets": TARGETS,
        "cases": cases,
        "summary": summarise(settings, cases),
    }


def summarise(settings: dict[str, Any], cases: list[dict[str, Any]]) -> dict[str, Any]:
    ok = ok_cases(cases)
    lo, hi = min(settings["contexts"]), max(settings["contexts"])
    out: dict[str, Any] = {}
    small, large = ok.get(("gsa", lo)), ok.get(("gsa", hi))
    if small and large and small.get("peak_rss_bytes") and large.get("peak_rss_bytes"):
        raw = large["peak_rss_bytes"] / small["peak_rss_bytes"]
        adjusted = ((large["peak_rss_bytes"] - large["linear_total_bytes"])
                    / (small["peak_rss_bytes"] - small["linear_total_bytes"]))
        out["gsa_peak_rss_ratio"] = {"contexts": [lo, hi], "raw": raw, "without_linear_terms": adjusted,
                                     "target_met": adjusted <= TARGETS["peak_rss_ratio"]}
    if small and large:
        ratio = large["time_to_first_token_s"] / small["time_to_first_token_s"]
        out["gsa_prefill_time_ratio"] = {"contexts": [lo, hi], "ratio": ratio, "tokens_ratio": hi / lo,
                                         "target_met": ratio <= TARGETS["prefill_time_ratio"] * (hi / lo) / 16}
    out["softmax"] = {c["context"]: c.get("status") if c.get("status") != "ok" else "ok"
                      for c in cases if c["model"] == "softmax"}
    return out


def _case_line(c: dict[str, Any]) -> str:
    if c.get("status") != "ok":
        return f"{c['model']:8s} n={c['context']:6d}  {c.get('status')}: {c.get('reason')}"
    peak = c.get("peak_rss_bytes")
    peak_text = "-" if peak is None else f"{peak / 2**20:8.1f} MiB"
    return (f"{c['model']:8s} n={c['context']:6d}  first token {c['time_to_first_token_s']:7.2f} s  "
            f"prefill {c['prefill_tokens_per_s']:8.1f} tok/s  decode {c['decode_ms_per_token']:7.1f} ms/token  "
            f"peak RSS {peak_text}  cache {c['cache_bytes'] / 2**20:8.2f} MiB")


# ----------------------------------------------------------------------------- outputs
def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | prompt | peak RSS (MiB) | O(n) terms (MiB) | first token (s) | prefill tok/s | decode ms/token "
             "| cache (MiB) | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report["cases"]:
        if c.get("status") != "ok":
            lines.append(f"| {c['model']} | {c['context']:,} | {c.get('status')}: {c.get('reason')} | | | | | | |")
            continue
        peak = "-" if c.get("peak_rss_bytes") is None else f"{c['peak_rss_bytes'] / 2**20:.0f}"
        load = c["loadavg_1m"]
        lines.append(f"| {c['model']} | {c['context']:,} | {peak} | {c['linear_total_bytes'] / 2**20:.1f} | "
                     f"{c['time_to_first_token_s']:.2f} | {c['prefill_tokens_per_s']:.0f} | "
                     f"{c['decode_ms_per_token']:.1f} | {c['cache_bytes'] / 2**20:.2f} | "
                     f"{load['start']:.1f}-{load['end']:.1f} |")
    summary = report["summary"]
    if "gsa_peak_rss_ratio" in summary:
        r = summary["gsa_peak_rss_ratio"]
        lines.append(f"\nGSA peak RSS {r['contexts'][1]:,} / {r['contexts'][0]:,}: {r['without_linear_terms']:.2f}x "
                     f"without the O(n) terms ({r['raw']:.2f}x raw; target <= {TARGETS['peak_rss_ratio']}x: "
                     f"{'met' if r['target_met'] else 'not met'})")
    if "gsa_prefill_time_ratio" in summary:
        r = summary["gsa_prefill_time_ratio"]
        lines.append(f"GSA time to first token {r['contexts'][1]:,} / {r['contexts'][0]:,}: {r['ratio']:.1f}x for "
                     f"{r['tokens_ratio']:.0f}x the tokens ({'met' if r['target_met'] else 'not met'})")
    return "\n".join(lines)


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in MODELS:
        cs = ok_series(report["cases"], kind)
        if not cs:
            continue
        xs = [c["context"] for c in cs]
        if all(c.get("peak_rss_bytes") for c in cs):
            axes[0].plot(xs, [c["peak_rss_bytes"] / 2**20 for c in cs], "o-", label=kind)
        axes[1].plot(xs, [c["time_to_first_token_s"] for c in cs], "o-", label=kind)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        if ax.get_lines():
            ax.legend()
    axes[0].set_ylabel("peak RSS during generate() (MiB)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("time to first token (s)")
    axes[0].set_title(f"memory, torch threads={report['settings']['threads']}")
    axes[1].set_title("prefill time")
    return fig


# ----------------------------------------------------------------------------- command line
def _models(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in MODELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"models are a comma list of {', '.join(MODELS)}; got {text!r}")
    return names


def options(parser: argparse.ArgumentParser) -> None:
    """The options of ``gsa bench longctx`` besides the scaffold's."""
    parser.add_argument("--contexts", type=parse_sizes, default=None,
                        help="prompt lengths: '4k,16k,64k' (default) or a power-of-two range '4k-64k'")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 16)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="tokens per prefill piece, both models (default 1024)")
    parser.add_argument("--splats", type=int, default=64, help="splats per head K of the GSA layers (default 64)")
    parser.add_argument("--models", type=_models, default=list(MODELS), help="gsa,softmax (default both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="kill a case that runs longer than this (default 3600)")
    parser.add_argument("--no-isolate", action="store_true", help="run the cases in this process (no peak RSS)")


BENCHMARK = Benchmark("longctx", __doc__.split("\n\n")[0], options, measure, markdown=markdown, plot=plot,
                      prepare=prepare, threads=2,
                      quick_help="smoke run: a tiny model, prompts of 256, 1k and 4k tokens, 4 new tokens")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
