"""``gpt-neo``: GPT-Neo's ``GPTNeoSelfAttention`` with ``_attn`` overridden.

The module keeps its class structure and its input/output interface (a subclass swapped in place),
so Hugging Face loading, the ``DynamicCache`` and ``generate()`` work unchanged; handed a store of
per-layer pasts (:class:`gsa_plugins.adapters.past.PastStore`: ``gsa_generate``'s recurrent cache,
which ``generate()`` uses by default), ``forward`` decodes from its stored past instead
(:func:`gsa_plugins.adapters.decoding.decode_with_store`; no ``n x n`` ``bias`` buffer is read on
that path), as :meth:`GPTNeoAdapter.decode_plan` says per layer.
Per layer type the params choose ``gsa``, ``exact`` (the original softmax) or ``hybrid`` (exact over the last
``hybrid_window`` keys plus GSA for older keys, one normaliser). A local layer in ``gsa`` mode keeps
its sliding window (only the ``dense`` backend serves windows); ``hybrid`` extends it with GSA.
GPT-Neo has no ``1/sqrt(d)`` logit scale, and neither has GSA.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import nn

from gsa_core.masks import MaskSpec
from gsa_plugins.adapters.base import (
    AdapterParams,
    HFAdapter,
    PositionTable,
    Site,
    UnsupportedModelError,
    describe_model,
    only_converted,
)
from gsa_plugins.adapters.decoding import decode_with_store
from gsa_plugins.adapters.layers import Mode
from gsa_plugins.adapters.past import DecodePlan, PastStore, exact_plan

if TYPE_CHECKING:
    from gsa_core.calibration import AttentionLayer


class GPTNeoParams(AdapterParams):
    global_layers: Mode = Field("gsa", description="mode of the global (full causal) layers")
    local_layers: Mode = Field("exact", description="mode of the local (sliding-window) layers")


@functools.cache
def gsa_self_attention_class() -> type:
    """``GPTNeoSelfAttention`` with ``_attn`` routed through the attached ``gsa`` layer."""
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    class GSAGPTNeoSelfAttention(GPTNeoSelfAttention):
        """GPT-Neo self-attention whose ``_attn`` is Gaussian Splat Attention unless switched off."""

        def _attn(self, query: Any, key: Any, value: Any, attention_mask: Any = None) -> tuple[Any, Any]:
            layer = self._modules.get("gsa")
            if layer is None or layer.passthrough:
                out = super()._attn(query, key, value, attention_mask)
                if layer is not None and layer.teacher is not None:
                    layer.tap_teacher(query, key, value, attention_mask, out[0], causal=True)
                return out
            batch, _, n_q, _ = query.shape
            # The model's mask (eager: additive 0 / min) is causal plus padding; the window is ours to add.
            spec = layer.masks.spec(attention_mask, batch, n_q, key.shape[-2], causal=True)
            return layer.attend(query, key, value, spec), None

        def forward(self, hidden_states: Any, attention_mask: Any = None, layer_past: Any = None,
                    use_cache: bool = False, output_attentions: bool = False, **kwargs: Any) -> tuple[Any, Any]:
            # A store of per-layer pasts (gsa_generate's recurrent cache: a GSA state, a key window) gets no
            # update(): the layer decodes from its stored past; every other cache takes the original path.
            if not isinstance(layer_past, PastStore):
                return super().forward(hidden_states, attention_mask=attention_mask, layer_past=layer_past,
                                       use_cache=use_cache, output_attentions=output_attentions, **kwargs)
            query = self._split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
            key = self._split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)
            value = self._split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
            out = decode_with_store(layer_past, int(self.layer_id), self._modules.get("gsa"), query, key, value,
                                    attention_mask)
            out = self.resid_dropout(self.out_proj(self._merge_heads(out, self.num_heads, self.head_dim)))
            return out, None

    GSAGPTNeoSelfAttention.__module__ = __name__
    GSAGPTNeoSelfAttention.__qualname__ = "GSAGPTNeoSelfAttention"
    return GSAGPTNeoSelfAttention


def __getattr__(name: str) -> type:
    if name == "GSAGPTNeoSelfAttention":  # created lazily (imports transformers); also for pickle
        return gsa_self_attention_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class GPTNeoAdapter(HFAdapter):
    """GPT-Neo: GPTNeoSelfAttention subclass with _attn overridden; global/local layer modes."""

    name = "gpt-neo"
    model_types = ("gpt_neo",)
    params_model = GPTNeoParams
    load_attn_implementation = "eager"  # the adapter subclasses the eager GPTNeoSelfAttention

    def sites(self, model: nn.Module) -> list[Site]:
        from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

        base = getattr(model, "base_model", model)
        names = {id(m): n for n, m in model.named_modules()}
        sites = []
        for i, block in enumerate(getattr(base, "h", [])):
            module = block.attn.attention
            if type(module) is not GPTNeoSelfAttention and not isinstance(module, gsa_self_attention_class()):
                raise UnsupportedModelError(
                    f"{describe_model(model)} layer {i} uses {type(module).__name__}; the gpt-neo adapter wraps "
                    "the eager GPTNeoSelfAttention: load the model with attn_implementation='eager'"
                )
            local = module.attention_type == "local"
            sites.append(Site(
                name=names[id(module)], module=module, layer=i, kind=module.attention_type,
                n_heads=module.num_heads, head_dim=module.head_dim, scaling=1.0, causal=True,
                window=int(module.config.window_size) if local else None,
            ))
        return sites

    def default_mode(self, site: Site, params: AdapterParams) -> Mode:
        assert isinstance(params, GPTNeoParams)
        return params.local_layers if site.kind == "local" else params.global_layers

    def default_hybrid_window(self, model: nn.Module) -> int | None:
        return int(model.config.window_size)

    def install(self, model: nn.Module, sites: list[Site], params: AdapterParams) -> None:
        cls = gsa_self_attention_class()
        for site in sites:
            site.module.__class__ = cls
            layer = site.module._modules.get("gsa")
            if layer is not None:
                layer.label = site.name  # errors about its inputs name the layer

    def decode_plan(self, model: nn.Module) -> list[DecodePlan]:
        """Per layer: GSA layers decode as their :meth:`GSALayer.decode_plan` says; exact ones (no GSA, or
        passthrough) keep their last ``window_size - 1`` keys (local layers) or every key (global ones)."""
        base = getattr(model, "base_model", model)
        blocks = getattr(base, "h", None)
        cls = gsa_self_attention_class()
        modules = [getattr(getattr(block, "attn", None), "attention", None) for block in blocks or ()]
        if not modules or not all(isinstance(m, cls) for m in modules):
            raise UnsupportedModelError(
                f"{describe_model(model)} has no GSA decode plan: supported are GPT-Neo models converted with the "
                "'gpt-neo' adapter (gsa_plugins.adapters.convert, eager attention); other models decode with "
                "transformers' own cache"
            )
        plans = []
        for module in modules:
            gsa = module._modules.get("gsa")
            if gsa is not None and not gsa.passthrough:
                plans.append(gsa.decode_plan())
            else:
                local = module.attention_type == "local"
                plans.append(exact_plan(int(module.config.window_size) if local else None, gsa))
        return plans

    def position_table(self, model: nn.Module) -> PositionTable | None:
        """GPT-Neo's learned absolute positions: ``wpe``, ``max_position_embeddings`` rows."""
        base = getattr(model, "base_model", model)
        wpe = getattr(base, "wpe", None)
        if not isinstance(wpe, nn.Embedding):
            return None
        name = next(n for n, m in model.named_modules() if m is wpe)
        return PositionTable(name=name, module=wpe)

    def positions_resized(self, model: nn.Module, n_positions: int) -> None:
        """An attention module that still holds GPT-Neo's ``P x P`` causal ``bias`` (an original, unconverted
        model) gets it rebuilt at the new size: its ``_attn`` slices it (the original's quadratic design)."""
        for site in self.sites(model):
            bias = getattr(site.module, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.numel() > 0:
                band = MaskSpec(causal=True, window=site.window)
                site.module.bias = band.allowed(n_positions, n_positions, device=bias.device)

    def attention_layers(self, model: nn.Module) -> list[AttentionLayer]:
        """``q_proj``/``k_proj``/``v_proj`` of every layer (scaling 1); before conversion every layer, after
        it the layers that have a splat bank."""
        from gsa_core.calibration import AttentionLayer

        layers = [AttentionLayer(name=s.name, query=s.module.q_proj, key=s.module.k_proj, value=s.module.v_proj,
                                 n_heads=s.n_heads, head_dim=s.head_dim, scaling=1.0) for s in self.sites(model)]
        return only_converted(model, layers)
