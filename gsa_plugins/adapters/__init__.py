"""Model adapters: convert Hugging Face models to Gaussian Splat Attention (GSA).

One small module per family (``gpt_neo``, ``bert``, ``llama``), registered as ``adapter`` plugins in
``gsa_plugins.plugin``; shared machinery in ``base`` (params, conversion, detection), ``layers`` (the
attached GSA module, masks, hybrid attention), ``interface`` (families using transformers'
``AttentionInterface``) and ``hf`` (GSA model classes, saving and loading).

    from gsa_plugins.adapters import convert, load_converted
    model = convert(model, {"adapter": {"name": "gpt-neo", "params": {"local_layers": "hybrid"}}})
    model.save_pretrained(path)
    again = load_converted(path)

Importing this package does not import ``transformers``; conversion and loading do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gsa_plugins.adapters.base import (
    INSTALL_HINT,
    AdapterParams,
    HFAdapter,
    ModelMismatchError,
    ModelShape,
    Site,
    UnsupportedModelError,
    adapter_for,
    adapter_for_config,
    banks,
    convert,
    detect_adapter,
    gsa_layers,
    is_converted,
    load_kwargs,
    set_passthrough,
)
from gsa_plugins.adapters.layers import GSALayer


def load_converted(path: str | Path, **kwargs: Any) -> Any:
    """Load a saved GSA checkpoint in one call (see :func:`gsa_plugins.adapters.hf.load_converted`)."""
    from gsa_plugins.adapters.hf import load_converted as _load

    return _load(path, **kwargs)


def register_auto_classes() -> None:
    """Make ``AutoModel*.from_pretrained`` load GSA checkpoints of every family with a registered adapter."""
    from gsa_plugins.adapters.hf import register_auto_classes as _register

    _register()


def attention_layers(model: Any) -> list[Any]:
    """The model's GSA layers as ``gsa_core.calibration.AttentionLayer`` descriptions (for calibration)."""
    return adapter_for(model).attention_layers(model)


__all__ = [
    "INSTALL_HINT", "AdapterParams", "GSALayer", "HFAdapter", "ModelMismatchError", "ModelShape", "Site",
    "UnsupportedModelError", "adapter_for", "adapter_for_config", "attention_layers", "banks", "convert",
    "detect_adapter", "gsa_layers", "is_converted", "load_converted", "load_kwargs", "register_auto_classes",
    "set_passthrough",
]
