"""Gaussian Splat Attention core: protocols, registry, config, splat bank and numerics.

Knows no model family and never imports ``transformers``.
"""

from gsa_core.attention import GSAAttention, GSAMultiheadAttention
from gsa_core.bank import SplatBank
from gsa_core.config import GSAConfig
from gsa_core.errors import (
    ConfigError,
    DuplicateComponentError,
    GSAError,
    MaskNotSupportedError,
    ParamsError,
    UnknownComponentError,
)
from gsa_core.hookspecs import hookimpl
from gsa_core.masks import MaskSpec
from gsa_core.protocols import (
    AttentionBackend,
    BirthPolicy,
    Births,
    DeathPolicy,
    Initializer,
    ModelAdapter,
    RecurrentBackend,
    Scheduler,
    SlotStats,
)
from gsa_core.registry import Registry, StrategyParams, build, get_registry, scoped_registry

__all__ = [
    "AttentionBackend", "BirthPolicy", "Births", "ConfigError", "DeathPolicy", "DuplicateComponentError",
    "GSAAttention", "GSAConfig", "GSAError", "GSAMultiheadAttention", "Initializer", "MaskNotSupportedError",
    "MaskSpec", "ModelAdapter", "ParamsError", "RecurrentBackend", "Registry", "Scheduler", "SlotStats",
    "SplatBank", "StrategyParams", "UnknownComponentError", "build", "get_registry", "hookimpl", "scoped_registry",
]
