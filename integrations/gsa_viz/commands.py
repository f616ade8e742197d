"""``gsa viz {splats, attention, coverage, adaptation}``: each picture's module configures its own parser and is
imported when ``gsa viz`` runs (``gsa --help`` imports none of them)."""

from __future__ import annotations

import argparse
import importlib

#: ``gsa viz NAME``: (module, help), in the order ``gsa viz --help`` lists them.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "splats": ("gsa_viz.splats", "a layer's splats as ellipses among its queries and keys (PCA plane)"),
    "attention": ("gsa_viz.attention", "GSA's attention beside the original softmax: difference, KL per row"),
    "coverage": ("gsa_viz.coverage", "share of held-out q/k inside some splat, per layer and head"),
    "adaptation": ("gsa_viz.adaptation", "a gsa train / gsa distill run: alive splats, births, deaths, loss and "
                   "shift signal per step"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="viz_command", required=True, metavar="PICTURE")
    for name, (module, help_text) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(child)


def add_model_arguments(parser: argparse.ArgumentParser, *, head_default: str = "0") -> None:
    """``MODEL``, ``--layer``, ``--head``, ``--out``: what the model pictures share."""
    parser.add_argument("model", metavar="MODEL", help="a GSA model folder (gsa convert, gsa distill's model/, "
                        "gsa train --attention gsa)")
    parser.add_argument("--layer", default=None, help="model layer index of a GSA layer (default: the first)")
    parser.add_argument("--head", default=head_default, help=f"head index or 'all' (default {head_default})")
    parser.add_argument("--out", required=True, help="the PNG to write")


def finish(path: object) -> int:
    """Say where the picture went; the exit status."""
    print(f"wrote {path}")
    return 0


__all__ = ["SUBCOMMANDS", "add_arguments", "add_model_arguments", "finish"]
