"""Distillation benchmark A: the real pretrained all-MiniLM-L6-v2, all six layers converted, sentence embeddings.

For each K (splats per head), initializer and window (none = GSA on every key pair; W = the exact symmetric
window ``|i - j| <= W`` plus GSA beyond it, one normaliser), ``gsa_distill.distill`` converts a fresh copy of
the model, calibrates it on the training split of the stdlib corpus and trains it (stage 1: splats vs each
layer's exact attention output; stage 2 if set: LoRA/full fine-tuning on the mean-pooled embedding cosine to
the original). Then, on a pool of **held-out sentences** (``gsa_data.split_sentences`` of documents that
``split_documents`` held out, never calibrated or trained on):

- ``cosine_mean``: mean cosine between the converted and the original sentence embedding (mean pooling over
  real tokens, as sentence-transformers does for this model);
- ``nn_agreement``: share of sentences whose nearest other sentence in the pool (cosine) is the same under
  both models.

A sanity baseline runs the converted model in passthrough (cosine must be 1.0). Every run's distillation
wall time is recorded. Writes ``distill_bert.json`` and ``distill_bert.md``.

Run: ``gsa bench distill_bert [--quick]`` or ``python -m gsa_bench.distill_bert``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from gsa_common import json_object_arg

from gsa_bench.args import csv_list, int_list
from gsa_bench.minilm import MINILM_NAME
from gsa_bench.scaffold import Benchmark, Run
from gsa_bench.scaffold import log as _log

SCHEMA = "gsa-bench-distill-bert/1"


# ----------------------------------------------------------------------------- data
def heldout_sentences(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """A seeded pool of distinct sentences from the held-out documents (the split distillation never sees)."""
    from gsa_data import load_corpus, split_documents, split_paragraphs, split_sentences

    docs = load_corpus(args.corpus)
    split = split_documents(docs, args.heldout_fraction)
    seen: set[str] = set()
    pool: list[str] = []
    for doc in split.heldout:
        for para in split_paragraphs(doc.text):
            for sentence in split_sentences(para):
                if args.min_chars <= len(sentence) <= args.max_chars and sentence not in seen:
                    seen.add(sentence)
                    pool.append(sentence)
    random.Random(args.seed).shuffle(pool)
    chosen = pool[:args.pool]
    info = {"corpus": args.corpus, "heldout_fraction": args.heldout_fraction, "heldout_documents": len(split.heldout),
            "candidate_sentences": len(pool), "pool": len(chosen), "sentence_chars": [args.min_chars, args.max_chars]}
    return chosen, info


def token_stats(batches: Sequence[dict[str, Any]], windows: Sequence[int]) -> dict[str, Any]:
    """Tokens per sentence, and per window the share of (query, key) pairs GSA computes (outside the window)."""
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(-1).tolist()]
    pairs = sum(n * n for n in lengths)
    outside = {}
    for w in windows:
        if w > 0:
            inside = sum(sum(min(n, i + w + 1) - max(0, i - w) for i in range(n)) for n in lengths)
            outside[str(w)] = 1.0 - inside / pairs
    return {"tokens_mean": statistics.fmean(lengths), "tokens_median": statistics.median(lengths),
            "tokens_max": max(lengths), "gsa_pair_share": {"0": 1.0, **outside}}


# ----------------------------------------------------------------------------- run
def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    import torch
    from gsa_calibrate.collect import token_batches
    from gsa_distill import distill, embedding_agreement, sentence_embeddings
    from transformers import AutoModel, AutoTokenizer

    from gsa_bench.minilm import minilm_path
    from gsa_plugins.adapters import convert, set_passthrough

    model_path = minilm_path(args.model)
    original = AutoModel.from_pretrained(model_path, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sentences, data_info = heldout_sentences(args)
    batches = token_batches(tokenizer, sentences, batch_size=64, max_length=args.max_length)
    reference = sentence_embeddings(original, batches)
    data_info.update(token_stats(batches, args.windows))
    _log(args, f"{len(sentences)} held-out sentences, {data_info['tokens_mean']:.1f} tokens on average")

    # Sanity: the converted model with GSA switched off (before any training) is the original, exactly.
    plain = convert(copy.deepcopy(original), {"adapter": {"name": "bert", "params": {"passthrough": True}}})
    data_info["passthrough_sanity"] = embedding_agreement(reference, sentence_embeddings(plain, batches))
    del plain

    grid = [(k, init, w) for k in args.splats for init in args.initializers for w in args.windows]
    results = []
    for i, (k, init, window) in enumerate(grid):
        budget = dict(args.grid_settings)
        is_best = args.best is not None and (k, init, window) == tuple(args.best["key"])
        if is_best:
            budget.update(args.best["settings"])
        settings = {"source": str(model_path), "output": None, "initializer": init,
                    "initializer_params": args.init_params.get(init, {"scale_factor": 4.0}),
                    "gsa": {"bank": {"n_splats": k}, "backend": "auto"}, "window": window or None,
                    "seed": args.seed, "progress": False, "eval_batches": 0, "max_length": args.max_length,
                    "corpus": args.corpus, "heldout_fraction": args.heldout_fraction,
                    **budget}
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        runner = distill(settings, model=copy.deepcopy(original), tokenizer=tokenizer, log=lambda m: None)
        wall = time.perf_counter() - t0
        got = sentence_embeddings(runner.model, batches)
        row: dict[str, Any] = {"splats": k, "initializer": init, "window": window, "budget": "best" if is_best else
                               "grid", "settings": {key: settings[key] for key in sorted(settings) if key != "source"},
                               "distill_s": wall, "timings": runner.report["timings"],
                               **embedding_agreement(reference, got)}
        if runner.report.get("stage2", {}).get("kind") in ("lora", "full"):
            # stage 2 moved the host's weights: how far its exact-attention (passthrough) embeddings moved
            set_passthrough(runner.model, True)
            row["host_passthrough"] = embedding_agreement(reference, sentence_embeddings(runner.model, batches))
            set_passthrough(runner.model, False)
        row["stage1_final_rel_mse"] = runner.report["stage1"]["history"][-1]["rel_mse"] if runner.report["stage1"][
            "history"] else None
        if "stage2" in runner.report:
            hist = runner.report["stage2"]["history"]
            row["stage2_final_loss"] = hist[-1]["loss"] if hist else None
        results.append(row)
        _log(args, f"[{i + 1}/{len(grid)}] K={k:<3} {init:>6} window={window:<3} cosine {row['cosine_mean']:.4f} "
                   f"NN agreement {row.get('nn_agreement', float('nan')):.3f}  ({wall:.0f} s)")
        run.save(_report(args, data_info, results))  # partial results after each run of the grid
    return _report(args, data_info, results)


def _report(args: argparse.Namespace, data_info: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {
        "schema": SCHEMA,
        "model": {"name": MINILM_NAME if args.model is None else str(args.model), "layers_converted": 6,
                  "teacher_attention": "sdpa"},
        "definitions": {
            "cosine_mean": "mean over the pool of cos(e_gsa(s), e_orig(s)), e = mean of the last hidden states over "
                           "real tokens (sentence-transformers' pooling; its final L2 normalisation does not change "
                           "cosines)",
            "nn_agreement": "share of pool sentences whose nearest other pool sentence by cosine is the same under "
                            "the converted and the original model",
            "window": "0: GSA on every query-key pair; W > 0: exact softmax logits for |i - j| <= W and GSA "
                      "log-weights beyond, one softmax (hybrid mode)",
            "gsa_pair_share": "per window, the share of real (query, key) pairs of the pool that GSA computes",
            "passthrough_sanity": "the converted model with GSA switched off, before any training, against the "
                                  "original (cosine must be 1: the conversion itself changes nothing)",
            "host_passthrough": "after stage 2: the distilled model with GSA switched off (its fine-tuned host "
                                "weights with exact attention) against the original",
            "distill_s": "wall time of gsa_distill.distill for the run (conversion, calibration, training; the "
                         "corpus is cached after the first run)",
            "held_out": "sentences from documents gsa_data.split_documents holds out (same split and salt as "
                        "distillation's), never used for calibration or training",
        },
        "settings": {"splats": args.splats, "initializers": args.initializers, "windows": args.windows,
                     "grid_settings": args.grid_settings, "best": args.best, "seed": args.seed,
                     "threads": torch.get_num_threads(), "max_length": args.max_length, **data_info},
        "results": results,
    }


# ----------------------------------------------------------------------------- output
def markdown_table(report: dict[str, Any]) -> str:
    """One row per run: K, initializer, window, budget, cosine, NN agreement, wall time."""
    head = ["K", "initializer", "window", "budget", "mean cosine", "min cosine", "top-1 NN agreement",
            "distill (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", "---", "---:", "---"] + ["---:"] * 4) + "|"]
    for r in report["results"]:
        lines.append("| " + " | ".join([
            str(r["splats"]), r["initializer"], str(r["window"] or "none"), r["budget"], f"{r['cosine_mean']:.4f}",
            f"{r['cosine_min']:.3f}", f"{r.get('nn_agreement', float('nan')):.3f}", f"{r['distill_s']:.0f}"]) + " |")
    st = report["settings"]
    sanity = st.get("passthrough_sanity", {}).get("cosine_mean")
    share = ", ".join(f"W={w}: {v:.0%}" for w, v in st.get("gsa_pair_share", {}).items() if w != "0")
    note = (f"\nall-MiniLM-L6-v2, all 6 layers converted; {st['pool']} held-out sentences "
            f"({st['tokens_mean']:.1f} tokens on average, at most {st['tokens_max']}); share of query-key pairs GSA "
            f"computes with a window: {share or 'n/a'}. Grid budget: {json.dumps(st['grid_settings'])}"
            + (f"; best-run budget for {st['best']['key']}: {json.dumps(st['best']['settings'])}" if st.get("best")
               else "")
            + f". Passthrough sanity cosine: {sanity if sanity is None else f'{sanity:.6f}'} "
            "(the converted model with GSA off, before training: must be 1). "
            f"{st['threads']} torch threads, 1-minute load average {report['loadavg_1m']['start']} at start.")
    return "\n".join(lines) + "\n" + note


def options(parser: argparse.ArgumentParser) -> None:
    """The options of ``gsa bench distill_bert`` besides the scaffold's."""
    parser.add_argument("--splats", type=int_list(1), default=[16, 64], help="K values (default 16,64)")
    parser.add_argument("--initializers", type=csv_list, default=["kmeans", "pca", "random"],
                        help="registered initializers (default kmeans,pca,random)")
    parser.add_argument("--windows", type=int_list(0), default=[0, 16],
                        help="exact window sizes, 0 = none (default 0,16)")
    parser.add_argument("--init-params", type=json_object_arg, default={}, metavar="JSON",
                        help='params per initializer (default {"scale_factor": 4.0} for each)')
    parser.add_argument("--grid-settings", type=json_object_arg, metavar="JSON",
                        default={"stage1_steps": 60, "stage1_lr": 0.03, "passage_chars": 200, "batch_size": 16,
                                 "calib_tokens": 5000},
                        help="DistillSettings for every grid run")
    parser.add_argument("--best", type=json_object_arg, default=None, metavar="JSON",
                        help='a stronger budget for one configuration: {"key": [K, init, window], "settings": {...}}')
    parser.add_argument("--pool", type=int, default=1000, help="held-out sentences (default 1000)")
    parser.add_argument("--min-chars", type=int, default=30)
    parser.add_argument("--max-chars", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--model", default=None, help="a local BERT model folder (default: the packaged MiniLM)")
    parser.add_argument("--seed", type=int, default=0)


def prepare(args: argparse.Namespace) -> None:
    if args.quick:
        args.splats, args.initializers, args.windows, args.pool = [16], ["kmeans"], [0], min(args.pool, 64)
        args.grid_settings = {**args.grid_settings, "stage1_steps": 3, "calib_tokens": 500}
        args.best = None
    if args.best is not None and not (isinstance(args.best.get("key"), list) and len(args.best["key"]) == 3
                                      and isinstance(args.best.get("settings"), dict)):
        raise SystemExit('--best must be {"key": [K, initializer, window], "settings": {...}}')


BENCHMARK = Benchmark("distill_bert", __doc__.split("\n\n")[0], options, measure, markdown=markdown_table,
                      prepare=prepare, quick_help="smoke run: K=16, kmeans, no window, 3 steps, 64 sentences")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main


if __name__ == "__main__":
    sys.exit(main())
