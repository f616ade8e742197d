"""``gsa eval ppl``: held-out loss against context length, and by position in the context.

The held-out documents of a corpus (``stdlib`` by default: the same split by document that ``gsa train``
holds out) are concatenated, each after an eos, into one long token stream. ``--windows`` anchors are
placed ``max(contexts)`` tokens apart; for a context ``C`` each window is the ``C`` tokens *ending* at an
anchor, so every context predicts the same last tokens and longer contexts add earlier ones. Per model and
context: the mean next-token loss, the loss by position bucket (``[0, 64)``, ``[64, 128)``, ... up to ``C``:
is the loss lower on later tokens?) and the loss on the last ``--tail`` tokens (the same tokens for every
context: does a longer context lower it?). Inputs go through the model in pieces through its cache
(:mod:`gsa_eval.models`), so GSA models run in linear memory.

Writes ``ppl_context.json``, ``ppl_context.md`` and ``ppl_context.png``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from gsa_bench.args import parse_sizes
from gsa_bench.scaffold import Benchmark, Run, log, pyplot
from gsa_common import check_range

from gsa_core.errors import ConfigError
from gsa_eval.models import DEFAULT_CHUNK, add_model_arguments, cache_bytes, check_specs, load_model, new_cache, stream

SCHEMA = "gsa-eval-ppl/1"
MAX_WINDOWS = 10_000


def token_stream(tokenizer: Any, texts: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Every text after an eos, concatenated: ``[n]`` token ids."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the model's tokenizer has no end-of-text token (eos), which separates the documents")
    ids: list[int] = []
    for row in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.append(eos)
        ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


def buckets(context: int) -> list[tuple[int, int]]:
    """``[0, 64), [64, 128), [128, 256), ...`` up to ``context`` (the last one ends at ``context - 1``)."""
    edges = [0, 64]
    while edges[-1] < context - 1:
        edges.append(min(edges[-1] * 2, context - 1))
    return [(a, b) for a, b in itertools.pairwise(edges) if a < b]


@torch.no_grad()
def window_losses(model: Any, window: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """Next-token losses ``[C - 1]`` of one window ``[C]`` (prediction ``i`` is made at position ``i``), and the
    model's cache size at the end."""
    ids = window.unsqueeze(0)
    cache = new_cache(model)
    losses = []
    for start, logits in stream(model, ids, cache, chunk=chunk):
        targets = ids[0, start + 1:start + 1 + logits.shape[1]]
        losses.append(F.cross_entropy(logits[0, :targets.shape[0]].float(), targets, reduction="none"))
    return torch.cat(losses), cache_bytes(cache)


def evaluate_context(model: Any, data: torch.Tensor, anchors: list[int], context: int, *, chunk: int,
                     tail: int) -> dict[str, Any]:
    """Loss of ``model`` on the windows of ``context`` tokens ending at ``anchors``."""
    total = torch.zeros(context - 1, dtype=torch.float64)
    memory = 0
    for end in anchors:
        losses, memory = window_losses(model, data[end - context:end], chunk)
        total += losses.double()
    mean = total / len(anchors)
    loss = float(mean.mean())
    tail = min(tail, context - 1)
    return {
        "context": context, "windows": len(anchors), "predictions": len(anchors) * (context - 1),
        "loss": loss, "ppl": math.exp(min(loss, 50.0)), "tail_tokens": tail, "tail_loss": float(mean[-tail:].mean()),
        "buckets": [{"start": a, "end": b, "loss": float(mean[a:b].mean())} for a, b in buckets(context)],
        "cache_bytes": memory,
    }


def _check(args: argparse.Namespace) -> None:
    if not args.models:
        raise ConfigError("name at least one MODEL (LABEL=PATH or PATH) to evaluate")
    check_range("--windows", args.windows, 1, MAX_WINDOWS)
    if min(args.contexts) < 2:
        raise ConfigError(f"--contexts must be at least 2 tokens, got {min(args.contexts)}")
    if args.tail < 1 or args.chunk < 1:
        raise ConfigError(f"--tail and --chunk must be positive numbers of tokens, got {args.tail} and {args.chunk}")
    check_specs(args.models, max_tokens=max(args.contexts), positions=args.positions)


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    from gsa_train.data import load_texts

    _check(args)
    texts = load_texts(args.corpus)
    longest = max(args.contexts)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {"contexts": args.contexts, "windows": args.windows, "tail": args.tail, "corpus": texts.source,
                     "heldout_passages": len(texts.heldout), "positions": args.positions, "chunk": args.chunk,
                     "threads": args.threads},
        "models": [], "results": [],
    }
    for spec in args.models:
        loaded = load_model(spec, max_tokens=longest, positions=args.positions)
        data = token_stream(loaded.tokenizer, texts.heldout)
        fit = len(data) // longest
        if fit == 0:
            raise ConfigError(f"the held-out text of {texts.source!r} has {len(data):,} tokens with {spec.label!r}'s "
                              f"tokenizer, fewer than the longest context ({longest:,}): use shorter --contexts")
        anchors = [longest * (i + 1) for i in range(min(args.windows, fit))]
        loaded.info["heldout_tokens"] = len(data)
        report["models"].append(loaded.info)
        for context in args.contexts:
            start = time.perf_counter()
            result = evaluate_context(loaded.model, data, anchors, context, chunk=args.chunk, tail=args.tail)
            result.update(model=spec.label, seconds=round(time.perf_counter() - start, 2))
            report["results"].append(result)
            log(args, f"{spec.label} context {context}: loss {result['loss']:.4f}, last {result['tail_tokens']} "
                      f"tokens {result['tail_loss']:.4f}")
            run.save(report)
    return report


def markdown(report: dict[str, Any]) -> str:
    contexts = report["settings"]["contexts"]
    tail = report["settings"]["tail"]
    lines = ["| model | attention | " + " | ".join(f"{c:,}: loss (last {tail})" for c in contexts) + " |",
             "|---|---|" + "---:|" * len(contexts)]
    kinds = {m["label"]: m["attention"] for m in report["models"]}
    by_model: dict[str, dict[int, dict[str, Any]]] = {}
    for r in report["results"]:
        by_model.setdefault(r["model"], {})[r["context"]] = r
    for label, rows in by_model.items():
        cells = [f"{rows[c]['loss']:.3f} ({rows[c]['tail_loss']:.3f})" if c in rows else "–" for c in contexts]
        lines.append(f"| {label} | {kinds.get(label, '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        by_model.setdefault(r["model"], []).append(r)
    for label, rows in by_model.items():
        rows = sorted(rows, key=lambda r: r["context"])
        line = left.plot([r["context"] for r in rows], [r["tail_loss"] for r in rows], marker="o", label=label)[0]
        last = rows[-1]
        mids = [(b["start"] + b["end"]) / 2 for b in last["buckets"]]
        right.plot(mids, [b["loss"] for b in last["buckets"]], marker=".", color=line.get_color(),
                   label=f"{label} ({last['context']:,})")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_xlabel("context (tokens)")
    left.set_ylabel(f"loss on the last {report['settings']['tail']} tokens")
    left.set_title("same tokens, longer context")
    right.set_xlabel("position in the context (bucket centre)")
    right.set_ylabel("held-out loss")
    right.set_title("loss by position, longest context")
    return fig


def options(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--contexts", type=parse_sizes, default=parse_sizes("512,2k,8k,16k"),
                        help="context lengths in tokens (default 512,2k,8k,16k)")
    parser.add_argument("--corpus", default="stdlib", help="corpus whose held-out documents are read (default stdlib)")
    parser.add_argument("--windows", type=int, default=4, help="windows per context (default 4; fewer if the "
                        "held-out text is shorter than windows x the longest context)")
    parser.add_argument("--tail", type=int, default=256, help="last tokens compared across contexts (default 256)")
    parser.add_argument("--positions", default=None, metavar="NAME",
                        help="extend a model's position table with this strategy when a context needs more positions")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                        help=f"tokens per prefill piece (default {DEFAULT_CHUNK})")


def quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.contexts, args.windows = [min(args.contexts)], 1


BENCHMARK = Benchmark("ppl_context", "held-out loss against context length and position", options, measure,
                      markdown=markdown, plot=plot, prepare=quick,
                      quick_help="the shortest context, one window: a smoke run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    BENCHMARK(parser)


__all__ = ["BENCHMARK", "SCHEMA", "add_arguments", "buckets", "evaluate_context", "markdown", "measure", "plot",
           "token_stream", "window_losses"]
