"""Commands and benchmarks that plugins add to the ``gsa`` command line (the ``gsa_register_commands`` hook).

A plugin's hook receives a :class:`CommandSet` and declares each command by name, help text and a
*target*: ``"module:attribute"`` (or the object itself) naming a callable that takes the command's
``argparse`` parser, adds its arguments and sets ``handler`` (``parser.set_defaults(handler=run)``;
``run(args)`` returns the exit status). Targets are imported only when their command is chosen, so
``gsa --help`` imports no command's code. Built-in commands and benchmarks register the same way.

Knows nothing of ``argparse`` beyond that convention, and imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gsa_core.registry import PluginInfo

#: ``gsa NAME`` and ``gsa bench NAME``.
GROUPS = ("command", "benchmark")


@dataclass(frozen=True)
class CommandSpec:
    """One ``gsa`` command (group ``command``) or ``gsa bench`` benchmark (group ``benchmark``)."""

    group: str
    name: str
    target: str | Callable[[Any], None]
    help: str
    provider: PluginInfo

    def load(self) -> Callable[[Any], None]:
        """The callable that configures the command's parser (imports its module now)."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attribute = self.target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in (attribute or "add_arguments").split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{self.target} is not callable (it must configure the command's parser)")
        return obj


class CommandSet:
    """What ``gsa_register_commands(cli)`` receives: ``cli.command(...)`` and ``cli.benchmark(...)``."""

    def __init__(self, provider: PluginInfo) -> None:
        self.provider = provider
        self.specs: list[CommandSpec] = []

    def command(self, name: str, target: str | Callable[[Any], None], *, help: str) -> None:
        """Add ``gsa NAME``: ``target`` configures its parser (``"module:function"``, imported when chosen)."""
        self._add("command", name, target, help)

    def benchmark(self, name: str, target: str | Callable[[Any], None], *, help: str) -> None:
        """Add ``gsa bench NAME`` (usually a ``gsa_bench.scaffold.Benchmark``, which configures its parser)."""
        self._add("benchmark", name, target, help)

    def _add(self, group: str, name: str, target: str | Callable[[Any], None], help: str) -> None:
        if not isinstance(name, str) or not name or name.startswith("-") or any(c.isspace() for c in name):
            raise ValueError(f"{group} names are non-empty words not starting with '-', got {name!r}")
        if not (callable(target) or (isinstance(target, str) and target.split(":")[0])):
            raise ValueError(f"{group} {name!r}: target must be 'module:attribute' or a callable, got {target!r}")
        self.specs.append(CommandSpec(group, name, target, help, self.provider))
