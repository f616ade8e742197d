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
    from gsa_demo.run import run_demo

    if args.steps < 1:
        raise SystemExit("gsa demo: --steps must be at least 1")
    run_demo(steps=args.steps, seed=args.seed, config_path=args.config, out_dir=args.out)
    return 0
