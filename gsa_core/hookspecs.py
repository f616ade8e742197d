"""The pluggy hook a GSA plugin implements.

A plugin is any importable object (usually a module) named by an entry point in the
``gsa.plugins`` group, with a ``gsa_register(registry)`` function marked ``@hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gsa_core.registry import Registry

PROJECT = "gsa"
ENTRY_POINT_GROUP = "gsa.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GSAHookSpecs:
    @hookspec
    def gsa_register(self, registry: Registry) -> None:
        """Register components with ``registry.register(kind, name, factory, params=...)``."""
