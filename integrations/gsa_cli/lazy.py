"""Subcommands whose arguments are added only when they are chosen, so ``gsa --help`` imports no command.

``gsa NAME ...`` and ``gsa bench NAME ...`` come from the registry (``gsa_register_commands``): each is
listed by name and help text, and its target (which adds its arguments and sets ``handler``) is
imported by :class:`LazySubcommands` when argparse dispatches to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from gsa_core.commands import CommandSpec


class LazySubcommands(argparse._SubParsersAction):
    """An ``add_subparsers`` action that configures a subcommand's parser on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, tuple[argparse.ArgumentParser, CommandSpec]] = {}

    def add_spec(self, spec: CommandSpec) -> argparse.ArgumentParser:
        """List ``spec`` now; configure its parser when it is chosen."""
        parser = self.add_parser(spec.name, help=spec.help, description=spec.help)
        self._pending[spec.name] = (parser, spec)
        return parser

    def configure(self, name: str) -> None:
        """Import ``name``'s target and let it add its arguments (a no-op once done)."""
        entry = self._pending.pop(name, None)
        if entry is None:
            return
        parser, spec = entry
        try:
            configure = spec.load()
        except Exception as exc:  # a plugin's broken command must not look like a bug of ours
            parser.error(f"command {spec.name!r} from {spec.provider.describe()} could not be loaded: "
                         f"{type(exc).__name__}: {exc}")
        configure(parser)

    def configure_all(self) -> None:
        """Configure every subcommand (for tools that walk the whole parser, e.g. documentation)."""
        for name in list(self._pending):
            self.configure(name)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        if isinstance(values, Sequence) and values and isinstance(values[0], str):
            self.configure(values[0])
        super().__call__(parser, namespace, values, option_string)


def add_commands(parser: argparse.ArgumentParser, specs: Sequence[CommandSpec], *, dest: str,
                 metavar: str) -> LazySubcommands:
    """A required subcommand of ``parser`` with one choice per spec (arguments added lazily)."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar, action=LazySubcommands)
    assert isinstance(sub, LazySubcommands)
    for spec in specs:
        sub.add_spec(spec)
    return sub
