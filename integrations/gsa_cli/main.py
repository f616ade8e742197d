"""The ``gsa`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gsa_cli.output import error
from gsa_core.errors import GSAError

#: ``gsa COMMAND``: the module ``gsa_cli.commands_<module>`` provides ``add_arguments(parser)``, which sets
#: a ``handler``. Modules import their heavy dependencies inside the handler, so ``gsa --help`` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("plugins", "inspect registered plugins and components"),
    "config": ("config", "validate configs, export the JSON Schema"),
    "demo": ("demo", "end-to-end demo on the embedded default (no download)"),
    "chat": ("chat", "chat with a model in the terminal (streams replies, keeps sessions)"),
    "logs": ("logs", "list and show saved chat sessions"),
    "train": ("train", "train a GPT-Neo (softmax or GSA) from scratch on a text corpus"),
    "convert": ("convert", "convert a Hugging Face model to GSA and save it"),
    "distill": ("distill", "calibrate and distil a converted model against its original"),
    "bench": ("bench", "run a benchmark; writes JSON and a plot"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsa", description="Gaussian Splat Attention tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f"gsa_cli.commands_{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gsa_cli.commands_{module_name}":  # a missing dependency is a real error
                raise
            continue
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
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
