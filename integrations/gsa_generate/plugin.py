"""The ``generate`` plugin (entry point ``gsa.plugins``): the recurrent cache as the default generation cache.

A converted model's ``generate()`` asks the registry (kind ``cache``) for its default cache, so the
model classes in ``gsa_plugins`` never import this integration. Importing this module is light: the
cache module (which imports ``transformers``) loads on first use.
"""

from __future__ import annotations

from typing import Any

from gsa_core.hookspecs import hookimpl
from gsa_core.registry import NoParams, Registry


class RecurrentCacheFactory:
    """The constant-memory recurrent GSA cache, for every model whose adapter has a decode plan."""

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params

    def supports(self, model: Any) -> bool:
        from gsa_generate.cache import supports_recurrent_cache

        return supports_recurrent_cache(model)

    def create(self, model: Any) -> Any:
        from gsa_generate.cache import recurrent_cache

        return recurrent_cache(model)


@hookimpl
def gsa_register(registry: Registry) -> None:
    registry.register("cache", "recurrent", RecurrentCacheFactory, NoParams)
