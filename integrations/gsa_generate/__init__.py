"""Generation with converted models: the constant-memory recurrent GSA cache (:mod:`gsa_generate.cache`).

``model.generate()`` on a converted GPT-Neo uses :class:`GSARecurrentCache` by default (the GSA model
class prepares it); pass ``cache=recurrent_cache(model)`` to keep it, or any other ``Cache`` to opt out.
"""

from gsa_generate.cache import GSARecurrentCache, LayerPlan, recurrent_cache, supports_recurrent_cache

__all__ = ["GSARecurrentCache", "LayerPlan", "recurrent_cache", "supports_recurrent_cache"]
