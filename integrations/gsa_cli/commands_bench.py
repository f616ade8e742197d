"""``gsa bench NAME``: the benchmarks plugins register (``gsa_register_commands``: ``cli.benchmark``).

The built-in ones come from ``gsa_bench.plugin``; each is imported only when it is chosen.
"""

from __future__ import annotations

import argparse

from gsa_cli.lazy import add_commands
from gsa_core.registry import get_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_commands(parser, get_registry().commands("benchmark"), dest="bench_command", metavar="BENCHMARK")
