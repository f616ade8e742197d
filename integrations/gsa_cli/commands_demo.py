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
    from gsa_data.files import check_destination
    from gsa_demo.run import run_demo

    from gsa_core.config import MAX_SEED, MAX_STEPS
    from gsa_core.errors import ConfigError

    if not 1 <= args.steps <= MAX_STEPS:
        raise ConfigError(f"--steps must be between 1 and {MAX_STEPS:,}, got {args.steps}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    check_destination(args.out, force=True, flag="--out")  # demo.json is replaced; a file or read-only: refused
    run_demo(steps=args.steps, seed=args.seed, config_path=args.config, out_dir=args.out)
    return 0
