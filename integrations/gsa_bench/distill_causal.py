"""Benchmark B (causal): does converting a trained GPT-Neo's global layers to GSA keep its perplexity?

Steps, all on this machine with nothing downloaded:

1. train the ``reference`` layout (TinyStories-33M's shape scaled down) with softmax attention by
   ``gsa_train`` on Python's docstrings, and measure its held-out perplexity;
2. convert its global layers to GSA (local sliding-window layers stay exact), calibrate the banks and
   distil with ``gsa_distill`` (stage 1: splats against the frozen original layer by layer; stage 2:
   the whole model against the original's next-token distribution), measuring held-out perplexity
   after each stage; the target is converted / original <= 1.05;
3. train the same layout with GSA from scratch on the same budget, for comparison.

Held-out text is the documents ``gsa_data.split_documents`` holds out (never trained, calibrated or
distilled on). Writes ``distill_causal.json`` and ``distill_causal.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gsa_bench.scaffold import Benchmark, Run

TARGET_RATIO = 1.05


def options(parser: argparse.ArgumentParser) -> None:
    """The options of ``gsa bench distill_causal`` besides the scaffold's."""
    parser.add_argument("--layout", default="reference", help="gsa_train layout (default reference)")
    parser.add_argument("--corpus", default="stdlib", help="stdlib, or a folder of .txt files")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each model trained (softmax, GSA)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--splats", type=int, default=64, help="splats per head (K)")
    parser.add_argument("--backend", default="kernel", help="GSA backend of the converted global layers")
    parser.add_argument("--stage1-steps", type=int, default=50)
    parser.add_argument("--stage1-lr", type=float, default=3e-2)
    parser.add_argument("--stage2", default="full", choices=["none", "lora", "full"])
    parser.add_argument("--stage2-steps", type=int, default=100)
    parser.add_argument("--stage2-lr", type=float, default=1e-3)
    parser.add_argument("--calib-tokens", type=int, default=8000)
    parser.add_argument("--eval-blocks", type=int, default=128, help="held-out rows of --block-len tokens")
    parser.add_argument("--no-scratch", action="store_true", help="skip training GSA from scratch")
    parser.add_argument("--hybrid", action="store_true",
                        help="also distil with the global layers hybrid (exact over the last window_size keys)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a softmax model saved by gsa train (its train.json is read) instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/distill_causal"), help="folder for the models")
    parser.add_argument("--progress", action="store_true", help="progress bars")


def _gsa_config(args: argparse.Namespace, global_mode: str = "gsa") -> dict[str, Any]:
    """Global layers ``gsa`` (or ``hybrid``: exact over the last ``window_size`` keys, GSA beyond); local exact."""
    return {"seed": args.seed, "bank": {"n_splats": args.splats}, "backend": args.backend,
            "adapter": {"name": "gpt-neo", "params": {"global_layers": global_mode, "local_layers": "exact"}}}


def _distil(args: argparse.Namespace, gsa: dict[str, Any], teacher_dir: Path, tokenizer: Any,
            ppl: Any) -> dict[str, Any]:
    """Convert the teacher with ``gsa``, calibrate and distil it with ``gsa_distill``; perplexity after each stage."""
    import torch
    from gsa_distill import Distiller, DistillSettings
    from gsa_train.loop import load_trained

    from gsa_plugins.adapters import set_passthrough

    settings = DistillSettings.build(
        source=str(teacher_dir), gsa=gsa, corpus=args.corpus, max_length=args.block_len,
        batch_size=args.batch_size, calib_tokens=args.calib_tokens, stage1_steps=args.stage1_steps,
        stage1_lr=args.stage1_lr, stage2=args.stage2, stage2_steps=args.stage2_steps, stage2_lr=args.stage2_lr,
        task_loss="logit-kl", seed=args.seed, progress=args.progress, eval_batches=0)
    runner = Distiller(settings, model=load_trained(teacher_dir), tokenizer=tokenizer, log=lambda msg: None)
    torch.manual_seed(args.seed)
    out: dict[str, Any] = {"gsa_config": gsa}
    try:
        runner.convert()
        runner.data()
        set_passthrough(runner.model, True)
        out["passthrough_ppl"] = ppl(runner.model)  # GSA off: must equal the original
        runner.calibrate()
        set_passthrough(runner.model, False)
        out["converted_ppl"] = {"calibrated": ppl(runner.model)}
        runner.stage1(None)
        set_passthrough(runner.model, False)
        out["converted_ppl"]["stage1"] = ppl(runner.model)
        if args.stage2 != "none":
            runner.stage2(None)
            set_passthrough(runner.model, False)
            out["converted_ppl"]["stage2"] = ppl(runner.model)
    finally:
        runner.dp.close()
    out["distill_report"] = {k: runner.report.get(k) for k in ("calibration", "stage1", "stage2")}
    out["distill_report"]["timings"] = {k: round(v, 2) for k, v in runner.timings.items()}
    return out


class _Clock:
    """Wall and process-CPU seconds of each phase, and the load average around it."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str) -> Any:
        import contextlib

        from gsa_common import load_average

        @contextlib.contextmanager
        def phase() -> Any:
            w0, c0, l0 = time.perf_counter(), time.process_time(), load_average()
            yield
            self.phases[name] = {"wall_s": round(time.perf_counter() - w0, 2),
                                 "cpu_s": round(time.process_time() - c0, 2), "load_start": l0,
                                 "load_end": load_average()}

        return phase()


def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    import torch
    from gsa_train.data import encode_blocks, load_texts
    from gsa_train.distributed import DataParallel
    from gsa_train.loop import DEFAULT_GSA, evaluate, load_trained, train
    from transformers import AutoTokenizer

    dp = DataParallel()  # one process: the benchmark measures quality, not scaling
    clock = _Clock()
    common = {"corpus": args.corpus, "layout": args.layout, "steps": args.steps, "batch_size": args.batch_size,
              "block_len": args.block_len, "lr": args.lr, "seed": args.seed, "eval_blocks": args.eval_blocks,
              "progress": args.progress, "log_every": 25}
    if args.teacher is None:
        with clock("train_softmax"):
            soft = train({**common, "attention": "softmax", "out": args.work / "softmax"}, dp).metrics
        teacher_dir = args.work / "softmax"
    else:  # the teacher's own recipe decides the data, layout and budget of the comparison
        teacher_dir = args.teacher
        soft = json.loads((teacher_dir / "train.json").read_text())
        for key in ("corpus", "layout", "steps", "batch_size", "block_len", "lr", "seed"):
            common[key] = soft["settings"][key]
        args.corpus, args.block_len, args.batch_size = common["corpus"], common["block_len"], common["batch_size"]
        args.layout, args.steps = common["layout"], common["steps"]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    texts = load_texts(args.corpus)
    heldout = encode_blocks(tokenizer, texts.heldout, args.block_len)[: args.eval_blocks]

    def ppl(model: Any) -> float:
        return evaluate(model, heldout, args.batch_size, dp)["ppl"]

    # the reference perplexity on exactly the rows every other model is evaluated on
    results: dict[str, Any] = {"softmax_ppl": ppl(load_trained(teacher_dir))}
    with clock("distill"):
        results.update(_distil(args, _gsa_config(args), teacher_dir, tokenizer, ppl))
    results["ratio"] = list(results["converted_ppl"].values())[-1] / results["softmax_ppl"]
    results["ratio_by_stage"] = {k: v / results["softmax_ppl"] for k, v in results["converted_ppl"].items()}
    results["target_met"] = results["ratio"] <= TARGET_RATIO
    if args.hybrid:
        with clock("distill_hybrid"):
            hybrid = _distil(args, _gsa_config(args, "hybrid"), teacher_dir, tokenizer, ppl)
        hybrid["ratio"] = list(hybrid["converted_ppl"].values())[-1] / results["softmax_ppl"]
        results["hybrid"] = hybrid
    if not args.no_scratch:
        with clock("train_gsa_scratch"):
            scratch_gsa = {**DEFAULT_GSA, "bank": {"n_splats": args.splats}, "backend": args.backend}
            gsa = train({**common, "attention": "gsa", "gsa": scratch_gsa, "out": args.work / "gsa_scratch",
                         "tokenizer": str(teacher_dir)}, dp).metrics
        results["scratch_gsa_ppl"] = gsa["final"]["heldout_ppl"]
        results["scratch_ratio"] = results["scratch_gsa_ppl"] / results["softmax_ppl"]
        results["scratch_adaptation"] = (gsa.get("adaptation") or {}).get("refines")
    return {
        "benchmark": "distill_causal",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"},
        "layout": soft["layout"], "parameters": soft["parameters"], "corpus": soft["corpus"],
        "gsa_config": _gsa_config(args), "target_ratio": TARGET_RATIO, "results": results,
        "softmax_history": soft["history"], "phases": clock.phases,
        "total_cpu_s": round(sum(p["cpu_s"] for p in clock.phases.values()), 1),
        "total_wall_s": round(sum(p["wall_s"] for p in clock.phases.values()), 1),
        "torch_threads": torch.get_num_threads(),
    }


def markdown_table(report: dict[str, Any]) -> str:
    r, st = report["results"], report["settings"]
    base = r["softmax_ppl"]
    rows = [("softmax (reference, trained)", base, 1.0),
            ("converted, GSA switched off (passthrough)", r["passthrough_ppl"], r["passthrough_ppl"] / base)]
    labels = {"calibrated": "converted + calibrated, no training", "stage1": "converted + stage 1 (layer-wise)",
              "stage2": f"converted + stage 2 ({st['stage2']}, logit KL)"}
    rows += [(labels[k], v, v / base) for k, v in r["converted_ppl"].items()]
    if "hybrid" in r:
        h = r["hybrid"]
        rows.append((f"hybrid global layers (exact last {report['layout']['window_size']} keys), stage "
                     f"{list(h['converted_ppl'])[-1]}", list(h["converted_ppl"].values())[-1], h["ratio"]))
    if "scratch_gsa_ppl" in r:
        rows.append(("GSA trained from scratch, same budget", r["scratch_gsa_ppl"], r["scratch_ratio"]))
    lines = ["| model | held-out perplexity | ratio to softmax |", "|---|---:|---:|"]
    lines += [f"| {name} | {p:.2f} | {q:.3f} |" for name, p, q in rows]
    lay, corpus = report["layout"], report["corpus"]
    phases = ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in report["phases"].items())
    load_end = report["loadavg_1m"]["end"] if "loadavg_1m" in report else report.get("load_average_end")  # older runs
    note = (f"\nLayout `{lay['name']}` (hidden {lay['hidden_size']}, {lay['num_layers']} layers alternating "
            f"global/local, {lay['num_heads']} heads, window {lay['window_size']}; {report['parameters']:,} "
            f"parameters), {st['steps']} steps x {st['batch_size']} x {st['block_len']} tokens, "
            f"{corpus['heldout_tokens']:,} held-out tokens. Converted: global layers GSA ({st['backend']}, "
            f"K={st['splats']}), local layers exact; distillation {st['stage1_steps']} + {st['stage2_steps']} "
            f"steps. Target ratio <= {report['target_ratio']}: {'met' if r['target_met'] else 'not met'} "
            f"(ratio {r['ratio']:.3f}). Wall time: {phases}; {report['total_cpu_s']:.0f} s CPU in all, "
            f"{report['torch_threads']} torch threads, load average {load_end} at the end.")
    return "\n".join(lines) + "\n" + note


# 1 thread by default: on a shared 2-core machine more threads ran slower
BENCHMARK = Benchmark("distill_causal", __doc__.split("\n\n")[0], options, measure, markdown=markdown_table,
                      threads=1)
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main

if __name__ == "__main__":
    sys.exit(main())
