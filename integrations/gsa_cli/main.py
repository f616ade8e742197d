"""The ``gsa`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gsa_cli import commands_bench, commands_config, commands_convert, commands_demo, commands_plugins
from gsa_cli.output import error
from gsa_core.errors import GSAError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsa", description="Gaussian Splat Attention tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands_plugins.add_arguments(sub.add_parser("plugins", help="inspect registered plugins and components"))
    commands_config.add_arguments(sub.add_parser("config", help="validate configs, export the JSON Schema"))
    commands_demo.add_arguments(sub.add_parser("demo", help="end-to-end demo on the embedded default (no download)"))
    commands_bench.add_arguments(sub.add_parser("bench", help="run a benchmark; writes JSON and a plot"))
    commands_convert.add_arguments(sub.add_parser("convert", help="convert a Hugging Face model to GSA and save it"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GSAError as exc:
        error(str(exc))
        return 2
    except KeyboardInterrupt:
        error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
