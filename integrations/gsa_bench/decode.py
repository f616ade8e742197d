"""Decode benchmark: tokens/s and cache memory against context, softmax KV cache vs the recurrent GSA cache.

Two models with the same random weights at the TinyStories-33M shape (hidden 768, 4 layers, 16 heads
of dim 48, layers alternating global/local with window 256, vocab 50257; positions raised to cover
the largest context): the original GPT-Neo (eager softmax attention, ``DynamicCache`` holding every
key and value) and its GSA conversion (global layers GSA through the ``kernel`` backend, local layers
exact; ``gsa_generate``'s recurrent cache: a kernel state per global layer, the last 255 keys per
local layer). For each context: prefill that many random tokens (``logits_to_keep=1``), both models
in pieces of ``--prefill-chunk`` tokens (the softmax model's ``n x n`` scores per layer, and the
``n x n`` float mask GPT-Neo builds for any model, would not fit at 16k in one forward), then decode
greedily one token at a time, timing every step. Each (model, context) case runs in a
fresh process (``gsa_bench.timing.run_isolated``), so memory readings and timings are not shared.

Writes ``decode.json`` (settings, environment, load average, per-step times, cache bytes, what the
original model allocates for its causal ``bias`` buffers) and ``decode.png``.

Run: ``gsa bench decode [--quick] [--out DIR]`` or ``python -m gsa_bench.decode``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Any

import gsa_common

from gsa_bench import timing
from gsa_bench.args import parse_sizes
from gsa_bench.scaffold import Benchmark, Run, log, ok_cases, ok_series, pyplot

SCHEMA = "gsa-bench-decode/1"
CASE_TARGET = "gsa_bench.decode:run_case"
MODELS = ("softmax", "gsa")
#: The TinyStories-33M shape (roneneldan/TinyStories-33M's config, positions aside).
TINYSTORIES = {"vocab_size": 50257, "hidden_size": 768, "num_layers": 4, "num_heads": 16, "window_size": 256,
               "attention_types": [[["global", "local"], 2]]}
QUICK_SHAPE = {"vocab_size": 101, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "window_size": 4,
               "attention_types": [[["global", "local"], 1]]}
DEFAULT_CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384]
TARGETS = {
    "gsa_flat_within": 0.10,  # GSA time per token: (max - min) / min across contexts
    "speedup_at_largest": 5.0,  # GSA tokens/s over softmax tokens/s at the largest context
}


# ----------------------------------------------------------------------------- models
def model_config(shape: dict[str, Any], max_positions: int) -> Any:
    from transformers import GPTNeoConfig

    return GPTNeoConfig(**shape, max_position_embeddings=max_positions, attn_implementation="eager",
                        bos_token_id=0, eos_token_id=0)


def build_model(kind: str, settings: dict[str, Any]) -> Any:
    """The softmax model (seeded random weights), or its GSA conversion with the original ``bias`` buffers dropped
    (the recurrent path never reads them; tests/test_generate_cache.py checks that)."""
    import torch
    from transformers import GPTNeoForCausalLM

    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; valid models: {', '.join(MODELS)}")
    torch.manual_seed(settings["seed"])
    model = GPTNeoForCausalLM(model_config(settings["shape"], settings["max_positions"])).eval()
    if kind == "gsa":
        from gsa_plugins.adapters import convert

        convert(model, settings["gsa_config"])
        for block in model.transformer.h:
            block.attn.attention.bias = torch.empty(0, dtype=torch.bool)
    return model


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a cache holds (keys and values of a DynamicCache; state and windows of ours)."""
    nbytes = getattr(cache, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def bias_bytes(settings: dict[str, Any]) -> int:
    """What the original GPT-Neo allocates for its causal ``bias`` buffers: one bool ``P x P`` per layer."""
    return settings["shape"]["num_layers"] * settings["max_positions"] ** 2


# ----------------------------------------------------------------------------- one case
def run_case(payload: dict[str, Any]) -> dict[str, Any]:
    """Prefill ``context`` random tokens into one model, then time ``steps`` greedy decode steps."""
    import torch
    from gsa_generate import recurrent_cache
    from transformers import DynamicCache

    settings, kind, context = payload["settings"], payload["model"], int(payload["context"])
    torch.set_num_threads(settings["threads"])
    model = build_model(kind, settings)
    gen = torch.Generator().manual_seed(settings["seed"] + context)
    ids = torch.randint(0, settings["shape"]["vocab_size"], (1, context), generator=gen)
    cache = DynamicCache(config=model.config) if kind == "softmax" else recurrent_cache(model)
    chunk = settings["prefill_chunk"]
    track = bool(payload.get("track_memory", True))  # gc + malloc_trim: only meaningful in a fresh process
    if track:
        timing.release_free_memory()
    rss_before = timing.rss_bytes()
    with torch.no_grad():
        start = time.perf_counter()
        for s in range(0, context, chunk):
            out = model(input_ids=ids[:, s:s + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        after_prefill = cache_bytes(cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times, cpu_times = [], []
        mem = timing.PeakMemory() if track else contextlib.nullcontext()
        with mem:
            for step in range(settings["warmup"] + settings["steps"]):
                t0, c0 = time.perf_counter(), time.process_time()
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                if step >= settings["warmup"]:
                    times.append(time.perf_counter() - t0)
                    cpu_times.append(time.process_time() - c0)
    median = statistics.median(times)
    return {
        "status": "ok", "model": kind, "context": context, "prefill_s": prefill_s, "prefill_chunk": chunk,
        "step_times_s": times, "median_step_s": median, "tokens_per_s": 1.0 / median,
        "min_step_s": min(times), "step_cpu_times_s": cpu_times, "median_step_cpu_s": statistics.median(cpu_times),
        "cache_bytes_after_prefill": after_prefill, "cache_bytes_after_decode": cache_bytes(cache),
        "cache_kinds": [p.kind for p in cache.plans] if hasattr(cache, "plans") else None,
        "decode_peak_added_bytes": mem.peak_bytes if isinstance(mem, timing.PeakMemory) else None,
        "rss_before_prefill_bytes": rss_before,
        "bias_buffer_bytes_held": sum(b.attn.attention.bias.numel() * b.attn.attention.bias.element_size()
                                      for b in model.transformer.h),
        "rss_after_decode_bytes": timing.rss_bytes(), "seen_tokens": cache.get_seq_length(),
    }


# ----------------------------------------------------------------------------- the run
def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    contexts = args.contexts or ([16, 32, 64] if args.quick else DEFAULT_CONTEXTS)
    steps = args.steps or (4 if args.quick else 32)
    shape = dict(QUICK_SHAPE if args.quick else TINYSTORIES)
    return {
        "shape": shape,
        "contexts": contexts,
        "steps": steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "seed": args.seed,
        "prefill_chunk": args.prefill_chunk,
        "max_positions": max(contexts) + args.warmup + steps + 8,
        "gsa_config": {"bank": {"n_splats": args.splats}, "backend": "kernel", "initializer": "random",
                       "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}},
    }


def summarise(settings: dict[str, Any], cases: list[dict[str, Any]]) -> dict[str, Any]:
    ok = ok_cases(cases)
    contexts = settings["contexts"]
    gsa = [ok[("gsa", n)] for n in contexts if ("gsa", n) in ok]
    soft = [ok[("softmax", n)] for n in contexts if ("softmax", n) in ok]
    out: dict[str, Any] = {"targets": TARGETS}
    if gsa:
        steps = [c["median_step_s"] for c in gsa]
        spread = (max(steps) - min(steps)) / min(steps)
        sizes = {c["cache_bytes_after_decode"] for c in gsa}
        best = [c["min_step_s"] for c in gsa]
        out["gsa_step_spread"] = spread
        out["gsa_min_step_spread"] = (max(best) - min(best)) / min(best)  # fastest step: less load-sensitive
        out["gsa_flat_target_met"] = spread <= TARGETS["gsa_flat_within"] and len(gsa) == len(contexts)
        out["gsa_cache_bytes"] = sorted(sizes)
        out["gsa_cache_constant"] = len(sizes) == 1 and len(gsa) == len(contexts)
    largest = max(contexts)
    if ("gsa", largest) in ok and ("softmax", largest) in ok:
        speedup = ok[("gsa", largest)]["tokens_per_s"] / ok[("softmax", largest)]["tokens_per_s"]
        out["speedup_at_largest"] = {"context": largest, "gsa_over_softmax": speedup,
                                     "target_met": speedup >= TARGETS["speedup_at_largest"],
                                     "by_fastest_step": ok[("softmax", largest)]["min_step_s"]
                                     / ok[("gsa", largest)]["min_step_s"]}
    if soft:
        out["softmax_cache_bytes"] = {c["context"]: c["cache_bytes_after_decode"] for c in soft}
    out["speedup_per_context"] = {n: ok[("gsa", n)]["tokens_per_s"] / ok[("softmax", n)]["tokens_per_s"]
                                  for n in contexts if ("gsa", n) in ok and ("softmax", n) in ok}
    return out


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    isolate = not args.no_isolate
    settings = settings_from_args(args)
    cases = []
    for context in settings["contexts"]:
        for kind in MODELS:
            payload = {"settings": settings, "model": kind, "context": context, "track_memory": isolate}
            if isolate:
                result = timing.run_isolated(CASE_TARGET, payload, timeout_s=args.case_timeout)
            else:
                result = run_case(payload)
            result.setdefault("model", kind)
            result.setdefault("context", context)
            result["loadavg_1m_after"] = gsa_common.load_average()
            cases.append(result)
            log(args, _case_line(result))
    return {
        "schema": SCHEMA,
        "what": "decode time per token and cache memory against context: the original GPT-Neo (softmax, "
                "DynamicCache with every key and value) vs its GSA conversion with gsa_generate's recurrent "
                "cache; batch 1, fp32, greedy, same random weights",
        "settings": settings,
        "models": {
            "softmax": "GPTNeoForCausalLM, eager attention, transformers DynamicCache (keys and values of every "
                       "token in every layer, local layers included; grown with torch.cat each step)",
            "gsa": "the same weights converted: global layers GSA (kernel backend, K splats per head, random "
                   "splat initialisation, not calibrated: speed and memory do not depend on the splat values), "
                   "local layers exact softmax over their 256-token window; GSARecurrentCache",
        },
        "original_bias_buffer": {
            "bytes": bias_bytes(settings),
            "what": "GPT-Neo's GPTNeoSelfAttention allocates a bool max_positions x max_positions 'bias' buffer per "
                    "layer (its causal/local mask) at construction; the softmax model holds them. The GSA model "
                    "is built the same way, then drops them (the recurrent path never reads them); memory "
                    "figures here are cache bytes, which exclude these buffers",
        },
        "method": {
            "timing": f"per decode step: wall time of one model forward on one token (time.perf_counter) plus "
                      f"the argmax; {settings['warmup']} untimed steps after the prefill, then "
                      f"{settings['steps']} timed; median reported; tokens/s = 1 / median",
            "cpu_time": "step_cpu_times_s: process CPU time (all threads) of the same steps; less sensitive than "
                        "wall time to other processes on the machine (but it counts threads' spin-waiting)",
            "cache_bytes": "sum of numel * element_size over the tensors the cache holds after decoding",
            "decode_peak_added_bytes": timing.PEAK_MEMORY_METHOD + " (over the decode loop)",
            "isolation": "each (model, context) case in a fresh process" if isolate else "in-process (smoke run)",
            "threads": settings["threads"],
        },
        "cases": cases,
        "summary": summarise(settings, cases),
    }


def _case_line(c: dict[str, Any]) -> str:
    if c.get("status") != "ok":
        return f"{c['model']:8s} n={c['context']:6d}  {c.get('status')}: {c.get('reason')}"
    return (f"{c['model']:8s} n={c['context']:6d}  {1000 * c['median_step_s']:8.2f} ms/token  "
            f"{c['tokens_per_s']:8.1f} tok/s  cache {c['cache_bytes_after_decode'] / 2**20:9.2f} MiB  "
            f"prefill {c['prefill_s']:.1f} s")


# ----------------------------------------------------------------------------- outputs
def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in MODELS:
        cs = ok_series(report["cases"], kind)
        if not cs:
            continue
        xs = [c["context"] for c in cs]
        axes[0].plot(xs, [1000 * c["median_step_s"] for c in cs], "o-", label=kind)
        axes[1].plot(xs, [c["cache_bytes_after_decode"] / 2**20 for c in cs], "o-", label=kind)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens before decoding)")
        ax.legend()
    axes[0].set_ylabel("median decode time per token (ms)")
    axes[0].set_title(f"decode, batch 1, torch threads={report['settings']['threads']}, "
                      f"load {report['loadavg_1m']['start']:.1f}-{report['loadavg_1m']['end']:.1f}")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("cache size (MiB)")
    axes[1].set_title("cache memory")
    return fig


def summary_text(report: dict[str, Any]) -> str:
    lines = ["| context | softmax ms/token | GSA ms/token | speedup | softmax CPU ms/token | GSA CPU ms/token | "
             "softmax cache MiB | GSA cache MiB |", "|---|---|---|---|---|---|---|---|"]
    ok = ok_cases(report["cases"])
    for n in report["settings"]["contexts"]:
        s, g = ok.get(("softmax", n)), ok.get(("gsa", n))

        def ms(c: dict[str, Any] | None) -> str:
            return "-" if c is None else f"{1000 * c['median_step_s']:.2f}"

        def cpu(c: dict[str, Any] | None) -> str:
            return "-" if c is None else f"{1000 * c['median_step_cpu_s']:.2f}"

        def mib(c: dict[str, Any] | None) -> str:
            return "-" if c is None else f"{c['cache_bytes_after_decode'] / 2**20:.2f}"

        speed = f"{g['tokens_per_s'] / s['tokens_per_s']:.1f}x" if s and g else "-"
        lines.append(f"| {n} | {ms(s)} | {ms(g)} | {speed} | {cpu(s)} | {cpu(g)} | {mib(s)} | {mib(g)} |")
    summ = report["summary"]
    if "gsa_step_spread" in summ:
        lines.append(f"GSA time per token spread across contexts: {100 * summ['gsa_step_spread']:.1f}% "
                     f"(target <= {100 * TARGETS['gsa_flat_within']:.0f}%: "
                     f"{'met' if summ['gsa_flat_target_met'] else 'not met'}; fastest-step spread "
                     f"{100 * summ['gsa_min_step_spread']:.1f}%); "
                     f"GSA cache constant: {summ['gsa_cache_constant']}")
    if "speedup_at_largest" in summ:
        sp = summ["speedup_at_largest"]
        lines.append(f"speedup at {sp['context']}: {sp['gsa_over_softmax']:.1f}x (target >= "
                     f"{TARGETS['speedup_at_largest']:g}x: {'met' if sp['target_met'] else 'not met'})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def options(parser: argparse.ArgumentParser) -> None:
    """The options of ``gsa bench decode`` besides the scaffold's."""
    parser.add_argument("--contexts", type=parse_sizes, default=None,
                        help="contexts: '512,1k' or a power-of-two range '512-16k' (default 512-16k)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per context (default 32)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default 3)")
    parser.add_argument("--splats", type=int, default=64, help="splats per head K of the GSA layers (default 64)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="tokens per prefill forward, both models (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="kill a case that runs longer than this (default 1800)")
    parser.add_argument("--no-isolate", action="store_true", help="run the cases in this process")


BENCHMARK = Benchmark("decode", __doc__.split("\n\n")[0], options, measure, plot=plot, summary=summary_text,
                      threads=2, quick_help="smoke run: a tiny model, contexts 16,32,64, 4 steps")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
