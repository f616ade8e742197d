"""Switch a converted model's recall cache on, off or to another policy, without retraining (LoLA is inference-only).

:func:`set_recall` is to the recall cache what ``set_passthrough`` is to GSA: it rebuilds each GSA layer's
policy from the new setting, validated as a config's would be, and records it in the model's GSA config
so ``save_pretrained`` keeps it. A generation cache made before the switch is refused afterwards (the
layers' signatures changed); start a fresh one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from gsa_core.config import GSAConfig
from gsa_plugins.adapters.base import ModelMismatchError, adapter_for, describe_model, gsa_layers, is_converted
from gsa_plugins.adapters.recall_cache import recall_layer_problem, recall_policy


def set_recall(model: nn.Module, recall: str | Mapping[str, Any] | None) -> list[str]:
    """Give ``model``'s GSA layers the recall cache ``recall`` (``{name, params, layers}``, a policy name, or None:
    none); returns the names of the layers that keep one. Bad settings raise before anything changes."""
    if not is_converted(model):
        raise ModelMismatchError(f"{describe_model(model)} is not GSA-converted: only GSA layers keep a recall cache")
    config = GSAConfig.from_model_config(model.config).with_updates(recall=recall)
    adapter = adapter_for(model)
    assert config.adapter is not None
    params = adapter.params_for(config)
    problem = recall_layer_problem(config, [(s.layer, adapter.mode(s, params), s.causal and s.kind != "cross",
                                             s.window) for s in adapter.sites(model)])
    if problem is not None:
        raise ModelMismatchError(f"{describe_model(model)}: {problem}")
    layers = gsa_layers(model)
    policies = {name: recall_policy(config, layer.layer, causal=layer.causal, mode=layer.mode, window=layer.window,
                                    backend=layer.backend, bank=layer.bank) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.recall = policies[name]
    seen: set[int] = set()
    for module in model.modules():  # every GSA config the model carries (composite models hold several)
        data = getattr(getattr(module, "config", None), "gsa", None)
        if isinstance(data, dict) and id(data) not in seen:
            seen.add(id(data))
            data["recall"] = config.to_dict()["recall"]
    return [name for name, policy in policies.items() if policy is not None]


__all__ = ["set_recall"]
