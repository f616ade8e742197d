"""``gsa demo``: the embedded end-to-end run (no download)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300, about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, help="a GSA config file instead of the embedded default")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where demo.json is written")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gsa_common import check_range
    from gsa_data.files import check_destination
    from gsa_demo.run import run_demo

    from gsa_core.config import MAX_SEED, MAX_STEPS

    check_range("--steps", args.steps, 1, MAX_STEPS)
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_destination(args.out, force=True, flag="--out")  # demo.json is replaced; a file or read-only: refused
    run_demo(steps=args.steps, seed=args.seed, config_path=args.config, out_dir=args.out)
    return 0
