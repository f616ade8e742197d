"""``encoder-decoder``: transformers' ``EncoderDecoderModel`` (e.g. bert2bert), each side by its own adapter.

The encoder and the decoder are converted by the adapters detected for them (the decoder's
cross-attention gets splat banks too: queries from the decoder, keys/values from the encoder, padding
on both sides), and the composite config points at their converted configs, so
``EncoderDecoderModel.from_pretrained`` (after ``register_auto_classes``) or ``load_converted`` rebuilds
both sides exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from torch import nn

from gsa_core.config import AdapterSpec, GSAConfig
from gsa_core.registry import StrategyParams
from gsa_plugins.adapters.base import (
    Site,
    UnsupportedModelError,
    adapter_for,
    adapter_for_config,
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

    def apply(self, model: Any, config: GSAConfig) -> None:
        """Rebuild both sides from their own GSA configs (``from_pretrained`` loads each side's GSA class,
        which does this by itself; here for a composite rebuilt by hand)."""
        for part in PARTS:
            sub = getattr(model, part)
            adapter_for(sub).apply(sub, GSAConfig.from_model_config(sub.config))

    # ------------------------------------------------------------ family facts: each side's, by its adapter
    def _parts(self, model: nn.Module) -> list[tuple[str, nn.Module, Any]]:
        return [(part, getattr(model, part), adapter_for(getattr(model, part))) for part in PARTS]

    def attn_implementation(self, model_config: Any) -> str | dict[str, str] | None:
        """Each side's implementation (one string when both agree, else one per sub-config)."""
        wanted: dict[str, str] = {}
        for part in PARTS:
            sub_config = getattr(model_config, part, None)
            adapter = adapter_for_config(sub_config) if sub_config is not None else None
            implementation = adapter.attn_implementation(sub_config) if adapter is not None else None
            if isinstance(implementation, str):
                wanted[part] = implementation
        if not wanted:
            return None
        if len(wanted) == len(PARTS) and len(set(wanted.values())) == 1:
            return next(iter(wanted.values()))
        return wanted

    def sites(self, model: nn.Module) -> list[Site]:
        """Both sides' sites, named by their path in the composite (``decoder.bert.encoder.layer.0...``)."""
        return [replace(site, name=f"{part}.{site.name}") for part, sub, adapter in self._parts(model)
                for site in adapter.sites(sub)]

    def attention_layers(self, model: nn.Module) -> list[AttentionLayer]:
        return [replace(layer, name=f"{part}.{layer.name}") for part, sub, adapter in self._parts(model)
                for layer in adapter.attention_layers(sub)]

    def lora_targets(self, model: nn.Module) -> list[str]:
        names: dict[str, None] = {}
        for _, sub, adapter in self._parts(model):
            names.update(dict.fromkeys(adapter.lora_targets(sub)))
        return list(names)

    def hybrid_params(self, model: nn.Module, params: Mapping[str, Any], window: int) -> dict[str, Any]:
        """Each side's params made hybrid by its own adapter (the decoder's cross-attention stays as it is)."""
        out = EncoderDecoderParams.model_validate(dict(params)).model_dump(mode="json")
        for part, sub, adapter in self._parts(model):
            out[part] = adapter.hybrid_params(sub, out[part], window)
        return out

    def decode_plan(self, model: nn.Module) -> list[Any]:
        """None: a composite generates with transformers' encoder-decoder cache (self and cross keys)."""
        raise UnsupportedModelError(
            f"adapter {self.name!r} has no decode plan for {describe_model(model)}: an encoder-decoder generates "
            "with transformers' own cache"
        )

    def forward_inputs(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The tokens go to the encoder and, shifted by nothing, to the decoder as well: one forward then runs
        every attention layer (encoder self, decoder self and cross) on real text."""
        inputs = dict(batch)
        inputs.setdefault("decoder_input_ids", inputs["input_ids"])
        if "attention_mask" in inputs:
            inputs.setdefault("decoder_attention_mask", inputs["attention_mask"])
        return inputs
