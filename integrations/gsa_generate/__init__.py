"""Generation with converted models: the constant-memory recurrent GSA cache (:mod:`gsa_generate.cache`).

``model.generate()`` on a converted GPT-Neo uses :class:`GSARecurrentCache` by default (this package's
plugin registers it as the default ``cache`` component); pass ``cache=recurrent_cache(model)`` to keep
it, or any other ``Cache`` to opt out. Names load lazily, so the plugin's registration imports nothing
heavy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GSARecurrentCache", "recurrent_cache", "supports_recurrent_cache"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gsa_generate import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
