"""The ``gsa`` argument parser: one subcommand per command the registry knows (``gsa_register_commands``).

The built-in commands come through the project's own entry point (``gsa_cli.plugin``), exactly as a
third party's do; their modules are imported only when chosen, so ``gsa --help`` stays fast.
"""

from __future__ import annotations

import argparse

from gsa_cli.lazy import add_commands
from gsa_core.registry import ALLOW_LIST_ENV, DISABLE_AUTOLOAD_ENV, get_registry


def build_parser() -> argparse.ArgumentParser:
    registry = get_registry()
    specs = registry.commands("command")
    epilog = None
    if not specs:
        epilog = (f"no commands are registered: plugin autoloading is off ({DISABLE_AUTOLOAD_ENV}) or "
                  f"{ALLOW_LIST_ENV} leaves out the built-in command plugin; add 'cli' (and 'builtin', 'bench') "
                  f"to {ALLOW_LIST_ENV}")
    parser = argparse.ArgumentParser(prog="gsa", description="Gaussian Splat Attention tools", epilog=epilog)
    add_commands(parser, specs, dest="command", metavar="COMMAND")
    return parser
