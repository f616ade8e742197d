"""Serving benchmark: ``gsa serve`` under 1-64 streaming clients, GSA's recurrent state vs softmax's KV cache.

One model, served two ways: a random GPT-Neo at the TinyStories-33M shape (hidden 768, 4 layers, 16
heads, window 256) with a byte-level BPE vocabulary trained on the standard library's docstrings
(GPT-2's 50257-word vocabulary cannot be trained from local text), saved as is (softmax attention,
transformers' ``DynamicCache``, which ``gsa serve`` batches by left-padding) and converted (global
layers GSA on the kernel backend, local layers exact: a recurrent state plus a 255-key window per
session). Each model runs in its own ``gsa serve`` subprocess on 127.0.0.1, with continuous batching
for both; the load generator is this process (:mod:`gsa_bench.serve_load`).

Three measurements per model:

- **throughput and latency** (prefix cache off): 1, 4, 16, 64 concurrent clients, each streaming
  completions of random token-id prompts (no shared prefixes) with ``ignore_eos``; aggregate tokens/s,
  p50/p99 time to first token and inter-token latency (at the client), the server's peak RSS;
- **memory per session**: one session at 1k and 8k tokens of context, its server-side past
  (``gsa_state_bytes`` read from /metrics while it decodes) and the server's RSS;
- **turn-10 time to first token** (prefix cache on): 10-turn chats (each request sends the whole
  conversation, as chat UIs do), turn 10's TTFT against the same conversation re-prefilled (its first
  message changed by one word, so no cached prefix matches: the same length, prefilled from scratch).

Run: ``gsa bench serve [--quick] [--out DIR]`` or ``python -m gsa_bench.serve``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from gsa_bench import serve_load
from gsa_bench.args import csv_list, int_list, parse_sizes
from gsa_bench.scaffold import Benchmark, Run, log, pyplot, quick_defaults

SCHEMA = "gsa-bench-serve/1"
MODELS = ("gsa", "softmax")
SHAPE = {"hidden_size": 768, "num_layers": 4, "num_heads": 16, "window_size": 256,
         "attention_types": [[["global", "local"], 2]]}
QUICK_SHAPE = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "window_size": 8,
               "attention_types": [[["global", "local"], 1]]}
TARGETS = {
    "batching_speedup_16": 4.0,  # aggregate tokens/s at 16 clients over 1 client, GSA
    "memory_ratio": 0.1,  # GSA per-session bytes over softmax's at the largest context
    "turn_ttft_ratio": 0.2,  # turn-10 TTFT with the prefix cache over re-prefilling, GSA
}
#: Tokens the one session of the memory measurement decodes: it must still run when /metrics is read.
PROBE_TOKENS = 64
#: --option: (quick, full) defaults
DEFAULTS = {"clients": ([1, 4], [1, 4, 16, 64]), "contexts": ([64, 256], [1024, 8192]), "prompt_tokens": (16, 128),
            "max_tokens": (8, 64), "requests": (1, 2), "turns": (3, 10), "turn_tokens": (24, 32),
            "conversations": (1, 3), "vocab": (2048, 16384)}


# ----------------------------------------------------------------------------- the models
def corpus_texts(quick: bool) -> list[str]:
    from gsa_data.corpus import pack_passages, stdlib_docstrings

    docs = stdlib_docstrings(packages=["json", "textwrap", "string"] if quick else None)
    return pack_passages(docs, max_chars=400)


def build_models(settings: dict[str, Any], root: Path, texts: list[str]) -> dict[str, Path]:
    """The softmax GPT-Neo and its GSA conversion (the same weights), each saved with the tokenizer."""
    import torch
    from gsa_train.tokenizer import train_tokenizer
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gsa_plugins.adapters import convert

    tokenizer = train_tokenizer(texts, vocab_size=settings["vocab"], min_frequency=1)
    settings["vocab_size"] = len(tokenizer)
    torch.manual_seed(settings["seed"])
    config = GPTNeoConfig(**settings["shape"], vocab_size=len(tokenizer), max_position_embeddings=settings["positions"],
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, attn_implementation="eager")
    model = GPTNeoForCausalLM(config).eval()
    folders = {kind: root / kind for kind in MODELS}
    model.save_pretrained(folders["softmax"])
    convert(model, settings["gsa_config"])
    model.save_pretrained(folders["gsa"])
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    return folders


def start_server(kind: str, folder: Path, settings: dict[str, Any], *, prefix_cache_mib: float) -> Any:
    from gsa_serve.launch import ServerProcess

    positions = settings["positions"]
    server = ServerProcess(str(folder), "--model-name", f"bench-{kind}", "--template", "plain",
                           "--max-sessions", str(max(settings["clients"])), "--max-queue", "100000",
                           "--max-prompt-tokens", str(positions - 1), "--max-tokens", str(positions - 1),
                           "--threads", str(settings["server_threads"]), "--prefix-cache-mib", str(prefix_cache_mib))
    server.wait(timeout=600)
    return server


# ----------------------------------------------------------------------------- one model
def load_levels(server: Any, kind: str, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    model = f"bench-{kind}"
    serve_load.one_stream(server.wait(), {"model": model, "prompt": [3, 4, 5], "max_tokens": 2, "ignore_eos": True})
    levels = {}
    for clients in settings["clients"]:
        exact = serve_load.reset_peak(server.pid)
        level = serve_load.concurrent_completions(
            server.wait(), model, clients=clients, requests_per_client=settings["requests"],
            prompt_tokens=settings["prompt_tokens"], max_tokens=settings["max_tokens"], vocab=settings["vocab_size"],
            seed=settings["seed"] + clients)
        level["peak_rss_bytes"] = serve_load.proc_status_bytes(server.pid, "VmHWM" if exact else "VmPeak")
        level["peak_rss_exact"] = exact
        levels[str(clients)] = level
        log(args, f"{kind:8s} {clients:3d} clients: {level['tokens_per_s']:8.1f} tok/s, TTFT p50 "
                  f"{_ms(level['ttft_p50_s'])} p99 {_ms(level['ttft_p99_s'])}, ITL p50 {_ms(level['itl_p50_s'])} "
                  f"p99 {_ms(level['itl_p99_s'])}, errors {level['errors']}")
    return levels


def session_memory(server: Any, kind: str, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per context: the bytes of one session's past on the server while it decodes (and the server's RSS)."""
    from gsa_serve.launch import scrape

    out = {}
    for context in settings["contexts"]:
        seen: dict[str, Any] = {}

        def probe(seen: dict[str, Any] = seen) -> None:
            samples = scrape(server.wait())
            seen.update(state_bytes=samples.get("gsa_state_bytes"), active=samples.get("gsa_active_sessions"),
                        rss_bytes=serve_load.proc_status_bytes(server.pid, "VmRSS"))

        rss_before = serve_load.proc_status_bytes(server.pid, "VmRSS")
        prompt = [3 + (i * 7919) % (settings["vocab_size"] - 3) for i in range(context)]
        result = serve_load.one_stream(server.wait(), {"model": f"bench-{kind}", "prompt": prompt,
                                                       "max_tokens": settings["probe_tokens"], "ignore_eos": True},
                                       on_first=probe)
        if seen.get("active") != 1:  # the probe must see this one session decoding, alone
            seen["state_bytes"] = None
        out[str(context)] = {**seen, "rss_before_bytes": rss_before, "error": result.error,
                             "prompt_tokens": result.prompt_tokens}
        log(args, f"{kind:8s} one session at {context} tokens: past {_mib(seen.get('state_bytes'))} on the server")
    return out


def turn_latency(server: Any, kind: str, settings: dict[str, Any], texts: list[str],
                 args: argparse.Namespace) -> dict[str, Any]:
    """Turn-N TTFT continuing the cached prefix, against the same conversation re-prefilled from scratch."""
    model, turns, conversations = f"bench-{kind}", settings["turns"], []
    for c in range(settings["conversations"]):
        users = [texts[(c * turns + t) % len(texts)][:settings["turn_chars"]] for t in range(turns)]
        records, messages = serve_load.conversation(server.wait(), model, users, settings["turn_tokens"])
        if "error" in records[-1]:
            conversations.append({"turns": records, "error": records[-1]["error"]})
            log(args, f"{kind:8s} conversation {c}: turn {len(records)} failed: {records[-1]['error']}")
            continue
        changed = [{**messages[0], "content": f"Variant {c}: {messages[0]['content']}"}, *messages[1:]]
        again = serve_load.one_stream(server.wait(), {"model": model, "messages": changed,
                                                      "max_tokens": settings["turn_tokens"], "ignore_eos": True,
                                                      "temperature": 0}, path="/v1/chat/completions")
        conversations.append({"turns": records, "reprefill": {"ttft_s": again.ttft_s, "error": again.error,
                                                              "prompt_tokens": again.prompt_tokens,
                                                              "cached_tokens": again.cached_tokens}})
        last = records[-1]
        log(args, f"{kind:8s} conversation {c}: turn {turns} TTFT {_ms(last['ttft_s'])} ({last['cached_tokens']} of "
                  f"{last['prompt_tokens']} prompt tokens cached), re-prefilled {_ms(again.ttft_s)}")
    done = [conv for conv in conversations if "error" not in conv]
    cached = [conv["turns"][-1]["ttft_s"] for conv in done if conv["turns"][-1]["ttft_s"] is not None]
    fresh = [conv["reprefill"]["ttft_s"] for conv in done if conv["reprefill"]["ttft_s"] is not None]
    return {"conversations": conversations, "turn_ttft_cached_median_s": statistics.median(cached) if cached else None,
            "turn_ttft_reprefill_median_s": statistics.median(fresh) if fresh else None}


def measure_model(kind: str, folder: Path, settings: dict[str, Any], texts: list[str],
                  args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    server = start_server(kind, folder, settings, prefix_cache_mib=0)
    try:
        result["levels"] = load_levels(server, kind, settings, args)
        result["memory"] = session_memory(server, kind, settings, args)
    finally:
        result["exit_status"] = server.stop(120, graceful=True)
        result["server_log_tail"] = "".join(server.stderr)[-2000:]
    server = start_server(kind, folder, settings, prefix_cache_mib=settings["prefix_cache_mib"])
    try:
        result["turns"] = turn_latency(server, kind, settings, texts, args)
        result["prefix_cache"] = {k: v for k, v in server.metrics().items() if k.startswith("gsa_prefix_cache")}
    finally:
        server.stop(120, graceful=True)
    return result


# ----------------------------------------------------------------------------- the run
def prepare(args: argparse.Namespace) -> None:
    from gsa_core.errors import GSAError

    quick_defaults(args, DEFAULTS)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise GSAError(f"--models {','.join(args.models)}: choose from {', '.join(MODELS)}")
    if args.server_threads < 1:
        raise GSAError(f"--server-threads {args.server_threads}: give at least 1")
    small = [n for n in ("prompt_tokens", "max_tokens", "requests", "turns", "turn_tokens", "conversations")
             if getattr(args, n) < 1]
    if small:
        raise GSAError(f"--{small[0].replace('_', '-')} must be at least 1")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "shape": dict(QUICK_SHAPE if args.quick else SHAPE), "vocab": args.vocab, "clients": args.clients,
        "contexts": args.contexts, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "requests": args.requests, "turns": args.turns, "turn_tokens": args.turn_tokens,
        "turn_chars": 120 if args.quick else 240, "conversations": args.conversations, "seed": args.seed,
        "server_threads": args.server_threads, "prefix_cache_mib": args.prefix_cache_mib,
        "probe_tokens": PROBE_TOKENS,
        "positions": max(max(args.contexts) + PROBE_TOKENS, 1024 if args.quick else 4096),
        "gsa_config": {"bank": {"n_splats": args.splats}, "backend": "kernel", "initializer": "random",
                       "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}},
    }


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    settings = settings_from_args(args)
    texts = corpus_texts(args.quick)
    report: dict[str, Any] = {"schema": SCHEMA, "settings": settings, "models": {}, "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="gsa-bench-serve-") as root:
        folders = build_models(settings, Path(root), texts)
        for kind in args.models:
            report["models"][kind] = measure_model(kind, folders[kind], settings, texts, args)
            run.save(report)
    report["summary"] = summarise(report)
    report["method"] = {
        "client": "one asyncio process (httpx) on the same machine; TTFT = first streamed text chunk minus request "
                  "start; ITL = gaps between streamed chunks; tokens/s = completion tokens (usage) / wall time",
        "server": f"gsa serve subprocess, torch threads {settings['server_threads']}, continuous batching for both "
                  "models (softmax: transformers DynamicCache left-padded per step batch; GSA: stacked recurrent "
                  "pasts); prefix cache off for throughput and memory, on for the turn test",
        "memory": "gsa_state_bytes on /metrics while the one session decodes: the bytes of its stored past "
                  "(states, kept windows, or every key and value); RSS from /proc/PID/status",
        "peak_rss": "VmHWM of the server process, reset (/proc/PID/clear_refs) before each concurrency level",
    }
    return report


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    models, out = report["models"], {}
    for kind, result in models.items():
        levels = result.get("levels", {})
        if "1" in levels and "16" in levels and levels["1"]["tokens_per_s"]:
            out[f"{kind}_batching_speedup_16"] = levels["16"]["tokens_per_s"] / levels["1"]["tokens_per_s"]
        turns = result.get("turns", {})
        if turns.get("turn_ttft_cached_median_s") and turns.get("turn_ttft_reprefill_median_s"):
            out[f"{kind}_turn_ttft_ratio"] = turns["turn_ttft_cached_median_s"] / turns["turn_ttft_reprefill_median_s"]
    if "gsa" in models and "softmax" in models:
        largest = str(max(report["settings"]["contexts"]))
        g = models["gsa"].get("memory", {}).get(largest, {}).get("state_bytes")
        s = models["softmax"].get("memory", {}).get(largest, {}).get("state_bytes")
        if g and s:
            out["memory_ratio"] = {"context": int(largest), "gsa_over_softmax": g / s}
    out["targets_met"] = {
        "batching_speedup_16": _met(out.get("gsa_batching_speedup_16"), TARGETS["batching_speedup_16"], above=True),
        "memory_ratio": _met((out.get("memory_ratio") or {}).get("gsa_over_softmax"), TARGETS["memory_ratio"]),
        "turn_ttft_ratio": _met(out.get("gsa_turn_ttft_ratio"), TARGETS["turn_ttft_ratio"]),
    }
    return out


def _met(value: float | None, target: float, *, above: bool = False) -> bool | None:
    if value is None:
        return None
    return value >= target if above else value <= target


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def _mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------- outputs
def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | clients | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | server peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, result in report["models"].items():
        for clients, lv in result.get("levels", {}).items():
            lines.append(f"| {kind} | {clients} | {lv['tokens_per_s']:.1f} | {_ms(lv['ttft_p50_s'])} | "
                         f"{_ms(lv['ttft_p99_s'])} | {_ms(lv['itl_p50_s'])} | {_ms(lv['itl_p99_s'])} | "
                         f"{_mib(lv['peak_rss_bytes'])} |")
    lines += ["", "| model | context | per-session past on the server | server RSS |", "|---|---:|---:|---:|"]
    for kind, result in report["models"].items():
        for context, mem in result.get("memory", {}).items():
            lines.append(f"| {kind} | {context} | {_mib(mem.get('state_bytes'))} | {_mib(mem.get('rss_bytes'))} |")
    turns = report["settings"]["turns"]
    lines += ["", f"| model | turn {turns} TTFT, prefix cache | re-prefilled | ratio |", "|---|---:|---:|---:|"]
    for kind, result in report["models"].items():
        t = result.get("turns", {})
        cached, fresh = t.get("turn_ttft_cached_median_s"), t.get("turn_ttft_reprefill_median_s")
        ratio = f"{cached / fresh:.2f}" if cached and fresh else "-"
        lines.append(f"| {kind} | {_ms(cached)} | {_ms(fresh)} | {ratio} |")
    summary = report.get("summary", {})
    met = summary.get("targets_met", {})
    speed, memory = summary.get("gsa_batching_speedup_16"), (summary.get("memory_ratio") or {})
    targets = [
        f"GSA tokens/s at 16 clients over 1 client {_x(speed)} (>= 4x: {_word(met.get('batching_speedup_16'))})",
        f"GSA per-session memory over softmax's at {memory.get('context', '-')} tokens "
        f"{_x(memory.get('gsa_over_softmax'))} (<= 0.1x: {_word(met.get('memory_ratio'))})",
        f"GSA turn-{turns} TTFT with the prefix cache over re-prefill {_x(summary.get('gsa_turn_ttft_ratio'))} "
        f"(<= 0.2x: {_word(met.get('turn_ttft_ratio'))})",
    ]
    lines += ["", "Targets: " + "; ".join(targets) + "."]
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _word(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "not met"


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, result in report["models"].items():
        levels = result.get("levels", {})
        xs = [int(c) for c in levels]
        axes[0].plot(xs, [lv["tokens_per_s"] for lv in levels.values()], "o-", label=kind)
        axes[1].plot(xs, [1000 * (lv["ttft_p50_s"] or 0) for lv in levels.values()], "o-", label=f"{kind} p50")
        axes[1].plot(xs, [1000 * (lv["ttft_p99_s"] or 0) for lv in levels.values()], "x--", label=f"{kind} p99")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.legend()
    axes[0].set_ylabel("aggregate tokens/s")
    axes[0].set_title(f"gsa serve, server torch threads {report['settings']['server_threads']}")
    axes[1].set_ylabel("time to first token (ms)")
    axes[1].set_yscale("log")
    return fig


# ----------------------------------------------------------------------------- command line
def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int_list(1), default=None, help="concurrency levels (default 1,4,16,64)")
    parser.add_argument("--contexts", type=parse_sizes, default=None,
                        help="session contexts for the memory measurement (default 1k,8k)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt tokens per request (default 128)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens generated per request (default 64)")
    parser.add_argument("--requests", type=int, default=None, help="requests per client, one after another (2)")
    parser.add_argument("--turns", type=int, default=None, help="turns of the chat in the prefix-cache test (10)")
    parser.add_argument("--turn-tokens", type=int, default=None, help="reply tokens per turn (32)")
    parser.add_argument("--conversations", type=int, default=None, help="chats in the prefix-cache test (3)")
    parser.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary to train (default 16384)")
    parser.add_argument("--splats", type=int, default=64, help="splats per head of the GSA layers (default 64)")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads of each server (default 1: the load generator has the other core)")
    parser.add_argument("--prefix-cache-mib", type=float, default=2048.0,
                        help="the servers' prefix cache in the turn test (default 2048)")
    parser.add_argument("--models", type=csv_list, default=list(MODELS),
                        help="which models (default gsa,softmax)")
    parser.add_argument("--seed", type=int, default=0)


BENCHMARK = Benchmark("serve", __doc__.split("\n\n")[0], options, measure, markdown=markdown, plot=plot,
                      prepare=prepare, threads=1,
                      quick_help="smoke run: a tiny model, 1 and 4 clients, contexts 64 and 256, 3 turns")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
