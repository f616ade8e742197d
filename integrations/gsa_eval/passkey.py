"""``gsa eval passkey``: can a model repeat a number hidden in filler text, against length and depth?

For every model (``LABEL=PATH``), length, depth and trial: a prompt of the passkey format
(:mod:`gsa_eval.passkey_task`) whose example (prompt + answer) has exactly that many tokens, prefilled in
pieces through the model's cache (linear memory on GSA models, :mod:`gsa_eval.models`), then greedy
decoding of as many tokens as the answer has; a trial is correct when the continuation starts with the
key. Accuracy per cell with a 95% Wilson interval. ``--recall`` also evaluates every GSA model with that
recall cache switched on at inference (LoLA's training-free use), labelled ``LABEL+recall``.

Writes ``passkey.json``, ``passkey.md`` and ``passkey.png`` (accuracy against length, one line per model).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from gsa_bench.args import csv_list, parse_sizes
from gsa_bench.scaffold import Benchmark, Run, log, pyplot
from gsa_common import check_range, json_object_arg

from gsa_core.config import GSAConfig
from gsa_core.errors import ConfigError
from gsa_eval.models import DEFAULT_CHUNK, Generate, add_model_arguments, cache_bytes, check_specs, greedy, load_model
from gsa_eval.passkey_task import MAX_KEY_DIGITS, PasskeyFormat, is_correct, wilson_interval

SCHEMA = "gsa-eval-passkey/1"
#: Most trials per cell and longest prompt: a bound on what one command line can ask for.
MAX_TRIALS = 100_000
MAX_LENGTH = 1 << 22


def score_cell(generate: Generate, fmt: PasskeyFormat, *, length: int, depth: float, trials: int, digits: int,
               seed: int) -> dict[str, Any]:
    """``trials`` prompts at one length and depth through ``generate``: the counts, accuracy and its interval."""
    correct, answers = 0, []
    for i in range(trials):
        example = fmt.trial(length, depth, digits, seed, i)
        text = fmt.tokenizer.decode(generate(example.prompt, len(example.answer)))
        hit = is_correct(text, example.key)
        correct += hit
        answers.append({"key": example.key, "output": text, "correct": hit})
    low, high = wilson_interval(correct, trials)
    return {"length": length, "depth": depth, "trials": trials, "correct": correct,
            "accuracy": correct / trials if trials else 0.0, "ci95": [low, high], "answers": answers}


def _generator(model: Any, chunk: int, memory: dict[str, int]) -> Generate:
    def generate(prompt: list[int], new_tokens: int) -> list[int]:
        out, cache = greedy(model, prompt, new_tokens, chunk=chunk)
        memory["cache_bytes"] = cache_bytes(cache)
        return out

    return generate


def _check(args: argparse.Namespace) -> None:
    if not args.models:
        raise ConfigError("name at least one MODEL (LABEL=PATH or PATH) to evaluate")
    check_range("--trials", args.trials, 1, MAX_TRIALS)
    check_range("--key-digits", args.key_digits, 1, MAX_KEY_DIGITS)
    if max(args.lengths) > MAX_LENGTH:
        raise ConfigError(f"--lengths: at most {MAX_LENGTH:,} tokens, got {max(args.lengths):,}")
    if args.chunk < 1:
        raise ConfigError(f"--chunk must be a positive number of tokens, got {args.chunk}")
    if args.recall is not None:  # validated as a config's recall setting would be, before any model is loaded
        GSAConfig.from_dict({"recall": args.recall}, source="--recall")
    check_specs(args.models, max_tokens=max(args.lengths), positions=args.positions)


def variants(args: argparse.Namespace) -> list[tuple[Any, dict[str, Any] | None]]:
    """``(spec, recall)`` per evaluated variant: every model as saved, and with ``--recall`` every GSA one again,
    except a model saved with that very cache (its ``+recall`` row would be the same model measured twice)."""
    from gsa_plugins.adapters.hf import is_gsa_checkpoint, read_checkpoint_config

    out: list[tuple[Any, dict[str, Any] | None]] = [(spec, None) for spec in args.models]
    if args.recall is not None:
        wanted = _recall_setting(args.recall)
        for spec in args.models:
            saved = read_checkpoint_config(spec.path)
            if is_gsa_checkpoint(saved) and _recall_setting((saved.get("gsa") or {}).get("recall")) != wanted:
                out.append((spec, args.recall))
    return out


def _recall_setting(recall: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recall setting with its defaults filled (validated), so equal settings compare equal however written."""
    if recall is None:
        return None
    cfg = GSAConfig.from_dict({"recall": recall}, source="--recall").recall
    return None if cfg is None else cfg.model_dump(mode="json")


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    _check(args)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {"lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                     "key_digits": args.key_digits, "seed": args.seed, "positions": args.positions,
                     "recall": args.recall, "chunk": args.chunk, "threads": args.threads},
        "models": [], "results": [],
    }
    for spec, recall in variants(args):
        loaded = load_model(spec, max_tokens=max(args.lengths), positions=args.positions, recall=recall)
        if recall is not None:
            loaded.info["label"] = f"{spec.label}+recall"
        label = loaded.info["label"]
        report["models"].append(loaded.info)
        fmt, memory = PasskeyFormat(loaded.tokenizer), {}
        generate = _generator(loaded.model, args.chunk, memory)
        for length in args.lengths:
            for depth in args.depths:
                start = time.perf_counter()
                cell = score_cell(generate, fmt, length=length, depth=depth, trials=args.trials,
                                  digits=args.key_digits, seed=args.seed)
                cell.update(model=label, seconds=round(time.perf_counter() - start, 3), **memory)
                report["results"].append(cell)
                log(args, f"{label} length {length} depth {depth}: {cell['correct']}/{cell['trials']}")
            run.save(report)
    report["summary"] = summary(report)
    return report


def summary(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model and length: every depth's trials pooled (accuracy and interval)."""
    out: dict[str, dict[str, Any]] = {}
    for cell in report["results"]:
        entry = out.setdefault(cell["model"], {}).setdefault(str(cell["length"]), {"correct": 0, "trials": 0})
        entry["correct"] += cell["correct"]
        entry["trials"] += cell["trials"]
    for lengths in out.values():
        for entry in lengths.values():
            entry["accuracy"] = entry["correct"] / entry["trials"]
            entry["ci95"] = list(wilson_interval(entry["correct"], entry["trials"]))
    return out


def markdown(report: dict[str, Any]) -> str:
    lengths = [str(n) for n in report["settings"]["lengths"]]
    lines = ["| model | attention | " + " | ".join(f"{int(n):,} tokens" for n in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    kinds = {m["label"]: m["attention"] for m in report["models"]}
    for label, by_length in report.get("summary", summary(report)).items():
        cells = []
        for n in lengths:
            e = by_length.get(n)
            cells.append("–" if e is None else f"{100 * e['accuracy']:.0f}% [{100 * e['ci95'][0]:.0f}–"
                         f"{100 * e['ci95'][1]:.0f}]")
        lines.append(f"| {label} | {kinds.get(label, '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, by_length in report.get("summary", summary(report)).items():
        xs = sorted(int(n) for n in by_length)
        acc = [by_length[str(n)]["accuracy"] for n in xs]
        low = [a - by_length[str(n)]["ci95"][0] for a, n in zip(acc, xs, strict=True)]
        high = [by_length[str(n)]["ci95"][1] - a for a, n in zip(acc, xs, strict=True)]
        ax.errorbar(xs, acc, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt + answer tokens")
    ax.set_ylabel("passkey accuracy (95% Wilson interval)")
    settings = report["settings"]
    ax.set_title(f"passkey retrieval, depths {settings['depths']}, {settings['trials']} trials each")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def options(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--lengths", type=parse_sizes, default=parse_sizes("1k,2k,4k,8k,16k"),
                        help="tokens per prompt + answer, e.g. 256,512 or 1k,2k (default 1k,2k,4k,8k,16k)")
    parser.add_argument("--depths", type=fraction_list, default=[0.1, 0.5, 0.9],
                        help="where the needle sits in the filler, fractions (default 0.1,0.5,0.9)")
    parser.add_argument("--trials", type=int, default=10, help="prompts per length and depth (default 10)")
    parser.add_argument("--key-digits", type=int, default=5, help="digits of each key (default 5; the "
                        "passkey-corpus recipe's default is 2)")
    parser.add_argument("--positions", default=None, metavar="NAME",
                        help="extend a model's position table with this strategy (interpolate, tile, ...) when a "
                        "length needs more positions (default: refuse such lengths)")
    parser.add_argument("--recall", type=_recall_arg, default=None, metavar="SPEC",
                        help="also evaluate every GSA model with this recall cache switched on: a policy name or "
                        'a JSON object, e.g. \'{"name": "self-recall", "params": {"budget": 64}}\'')
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                        help=f"tokens per prefill piece (default {DEFAULT_CHUNK})")
    parser.add_argument("--seed", type=int, default=0)


def fraction_list(text: str) -> list[float]:
    """``0.1,0.5,0.9``: a non-empty comma list of numbers in [0, 1] (an argparse type)."""
    try:
        values = [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in [0, 1], got {text!r}")
    return values


def _recall_arg(text: str) -> dict[str, Any]:
    return json_object_arg(text) if text.lstrip().startswith("{") else {"name": text}


def quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.lengths, args.depths, args.trials = [min(args.lengths)], [0.5], 1


BENCHMARK = Benchmark("passkey", "passkey retrieval against prompt length and depth", options, measure,
                      markdown=markdown, plot=plot, prepare=quick,
                      quick_help="one length (the shortest), one depth, one trial: a smoke run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    BENCHMARK(parser)


__all__ = ["BENCHMARK", "SCHEMA", "add_arguments", "markdown", "measure", "plot", "score_cell", "summary", "variants"]
