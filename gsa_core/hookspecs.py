"""The pluggy hooks a GSA plugin implements.

A plugin is any importable object (usually a module) named by an entry point in the ``gsa.plugins``
group, with one or both of these functions marked ``@hookimpl``:

- ``gsa_register(registry)``: components (strategies, backends, adapters) by ``(kind, name)``;
- ``gsa_register_commands(cli)``: ``gsa`` commands and ``gsa bench`` benchmarks (as simonw/llm's
  ``register_commands``; the built-in commands and benchmarks register the same way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gsa_core.commands import CommandSet
    from gsa_core.registry import Registry

PROJECT = "gsa"
ENTRY_POINT_GROUP = "gsa.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GSAHookSpecs:
    @hookspec
    def gsa_register(self, registry: Registry) -> None:
        """Register components with ``registry.register(kind, name, factory, params=...)``."""

    @hookspec
    def gsa_register_commands(self, cli: CommandSet) -> None:
        """Add commands: ``cli.command(name, "module:add_arguments", help=...)`` for ``gsa NAME`` and
        ``cli.benchmark(name, "module:BENCHMARK", help=...)`` for ``gsa bench NAME``. Targets are imported
        only when their command runs; a hook that raises is skipped with a warning."""
