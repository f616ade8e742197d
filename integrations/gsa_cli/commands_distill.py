"""``gsa distill SRC DST``: calibrate, distil and save a GSA model (see ``gsa_distill``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gsa_common import json_object_arg

from gsa_cli.output import print_json

STAGE2 = ("none", "lora", "full")


def _regulariser(text: str) -> tuple[str, float]:
    name, sep, weight = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT (e.g. overlap=0.01), got {text!r}")
    try:
        return name.strip(), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"regulariser weight must be a number, got {weight!r}") from None



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source Hugging Face model folder")
    parser.add_argument("dst", type=Path, help="output folder: model/, distill.json, checkpoints/")
    parser.add_argument("--config", type=Path,
                        help="GSA config file (TOML/JSON/YAML); an optional [distill] table in it holds these settings")
    parser.add_argument("--initializer", help="registered initializer for calibration (default kmeans)")
    parser.add_argument("--init-params", type=json_object_arg, metavar="JSON", help="the initializer's params")
    parser.add_argument("--splats", type=int, metavar="K", help="splats per head (overrides bank.n_splats)")
    parser.add_argument("--window", type=int, metavar="W",
                        help="exact window of W keys (each side for encoders) plus GSA beyond it: hybrid mode")
    parser.add_argument("--corpus", help="stdlib | docstrings | topics | a folder of .txt files (default stdlib)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--calib-tokens", type=int)
    parser.add_argument("--stage1-steps", type=int)
    parser.add_argument("--stage1-lr", type=float)
    parser.add_argument("--stage2", choices=STAGE2, help="task-loss fine-tuning after stage 1 (default none)")
    parser.add_argument("--stage2-steps", type=int)
    parser.add_argument("--stage2-lr", type=float)
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--regulariser", type=_regulariser, action="append", metavar="NAME=WEIGHT",
                        help="splat regulariser (repeatable): overlap, amplitude-l1")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true", help="continue from DST/checkpoints/last.pt")
    parser.add_argument("--force", action="store_true",
                        help="distil into a non-empty DST, replacing its files (an old checkpoint stays until this "
                             "run writes its own)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    """File ``[distill]`` settings, then the flags given on the command line (flags win)."""
    from gsa_distill.settings import DEFAULT_GSA, DistillSettings, check_effective, read_settings_file

    gsa: dict[str, Any] = dict(DEFAULT_GSA)
    values: dict[str, Any] = {}
    if args.config is not None:
        gsa, values = read_settings_file(args.config)
    gsa = json.loads(json.dumps(gsa))  # a deep copy we may edit
    if args.splats is not None:
        gsa.setdefault("bank", {})["n_splats"] = args.splats
    flags = {"initializer": args.initializer, "initializer_params": args.init_params, "corpus": args.corpus,
             "batch_size": args.batch_size, "max_length": args.max_length, "calib_tokens": args.calib_tokens,
             "stage1_steps": args.stage1_steps, "stage1_lr": args.stage1_lr, "stage2": args.stage2,
             "stage2_steps": args.stage2_steps, "stage2_lr": args.stage2_lr, "lora_rank": args.lora_rank,
             "checkpoint_every": args.checkpoint_every, "seed": args.seed, "window": args.window}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.regulariser:
        values["regularisers"] = {**values.get("regularisers", {}), **dict(args.regulariser)}
    if args.resume:
        values["resume"] = True
    if args.no_progress:
        values["progress"] = False
    check_effective(values)
    values.update(source=args.src, output=args.dst, gsa=gsa)
    return DistillSettings.build(**values)


def run(args: argparse.Namespace) -> int:
    from gsa_data.files import check_destination
    from gsa_distill import distill

    from gsa_plugins.adapters.hf import read_checkpoint_config

    settings = settings_from_args(args)  # every settings error before the slow load
    check_destination(args.dst, sources=[args.src], writes=[args.dst / "model"], force=args.force,
                      resume=args.resume)
    read_checkpoint_config(args.src)  # a model folder with intact weights, before anything is written
    runner = distill(settings)
    report = runner.report
    if not runner.dp.is_main:
        return 0
    if args.json:
        print_json(report)
        return 0
    errors = report.get("layer_error", {})
    for label, per_layer in errors.items():
        values = [v["rel_err"] for v in per_layer.values()]
        print(f"{label:>10}: held-out attention rel. error per layer "
              + " ".join(f"{v:.3f}" for v in values) + f"  (mean {sum(values) / len(values):.3f})")
    for label, emb in report.get("embedding", {}).items():
        print(f"{label:>10}: held-out embedding cosine {emb['cosine_mean']:.4f}")
    print(f"saved {args.dst / 'model'} and {args.dst / 'distill.json'} "
          f"({report['timings']['run_s']:.1f} s)")
    return 0
