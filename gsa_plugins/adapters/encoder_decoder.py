"""``encoder-decoder``: transformers' ``EncoderDecoderModel`` (e.g. bert2bert), each side by its own adapter.

The encoder and the decoder are converted by the adapters detected for them (the decoder's
cross-attention gets splat banks too: queries from the decoder, keys/values from the encoder, padding
on both sides), and the composite config points at their converted configs, so
``EncoderDecoderModel.from_pretrained`` (after ``register_auto_classes``) or ``load_converted`` rebuilds
both sides exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from torch import nn

from gsa_core.config import AdapterSpec, GSAConfig
from gsa_core.registry import StrategyParams
from gsa_plugins.adapters.base import (
    UnsupportedModelError,
    as_gsa_config,
    available_adapters_text,
    describe_model,
    detect_adapter,
    is_converted,
)

if TYPE_CHECKING:
    from gsa_core.calibration import AttentionLayer

PARTS = ("encoder", "decoder")


class EncoderDecoderParams(StrategyParams):
    passthrough: bool = Field(False, description="GSA switched off on both sides (original attention, exactly)")
    encoder: dict[str, Any] = Field(default_factory=dict, description="params of the encoder's (detected) adapter")
    decoder: dict[str, Any] = Field(default_factory=dict, description="params of the decoder's (detected) adapter")


class EncoderDecoderAdapter:
    """EncoderDecoderModel (e.g. bert2bert): encoder and decoder converted by their own adapters."""

    name = "encoder-decoder"
    model_types = ("encoder-decoder",)
    params_model = EncoderDecoderParams

    def __init__(self, params: EncoderDecoderParams | None = None) -> None:
        self.params = params if params is not None else EncoderDecoderParams()

    def matches(self, model: Any) -> bool:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return isinstance(model, nn.Module) and model_type in self.model_types and all(
            isinstance(getattr(model, part, None), nn.Module) for part in PARTS)

    def convert(self, model: Any, config: GSAConfig | Mapping[str, Any] | str | Path | None = None) -> Any:
        cfg = as_gsa_config(config)
        if not self.matches(model):
            raise UnsupportedModelError(f"adapter {self.name!r} does not support {describe_model(model)}. "
                                        f"{available_adapters_text()}")
        params = self.params
        if cfg.adapter is not None:
            params = EncoderDecoderParams.model_validate(cfg.adapter.params)
        if any(is_converted(getattr(model, part)) for part in PARTS):
            raise UnsupportedModelError(f"{describe_model(model)} is already GSA-converted")
        for part in PARTS:
            sub = getattr(model, part)
            adapter = detect_adapter(sub)
            sub_params = dict(getattr(params, part))
            sub_params["passthrough"] = params.passthrough or bool(sub_params.get("passthrough", False))
            adapter.convert(sub, cfg.model_copy(update={"adapter": AdapterSpec(name=adapter.name, params=sub_params)}))
            setattr(model.config, part, sub.config)
        spec = AdapterSpec(name=self.name, params=params.model_dump(mode="json"))
        model.config.gsa = cfg.model_copy(update={"adapter": spec}).to_dict()
        return model

    def attention_layers(self, model: nn.Module) -> list[AttentionLayer]:
        from dataclasses import replace

        from gsa_plugins.adapters.base import adapter_for

        layers = []
        for part in PARTS:
            sub = getattr(model, part)
            layers += [replace(layer, name=f"{part}.{layer.name}") for layer in adapter_for(sub).attention_layers(sub)]
        return layers
