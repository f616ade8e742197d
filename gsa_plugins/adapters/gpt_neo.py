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

import contextlib
import copy
import functools
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import Tensor, nn

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
from gsa_plugins.adapters.long_inputs import banded_attention, is_padding_row, key_validity
from gsa_plugins.adapters.past import DecodePlan, PastStore, exact_plan

if TYPE_CHECKING:
    from gsa_core.calibration import AttentionLayer


class GPTNeoParams(AdapterParams):
    global_layers: Mode = Field("gsa", description="mode of the global (full causal) layers")
    local_layers: Mode = Field("exact", description="mode of the local (sliding-window) layers")


#: Held while a GSA model is built: the attention class GPT-Neo's blocks construct is swapped for ours meanwhile.
_BUILDING = threading.RLock()


def _one_position(config: Any) -> Any:
    """A shallow copy of ``config`` with one position: what GPT-Neo's ``__init__`` sizes its ``bias`` by."""
    small = copy.copy(config)
    small.max_position_embeddings = 1
    return small


@functools.cache
def gsa_self_attention_class() -> type:
    """``GPTNeoSelfAttention`` with ``_attn`` routed through the attached ``gsa`` layer, and no ``n x n`` buffer."""
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    class GSAGPTNeoSelfAttention(GPTNeoSelfAttention):
        """GPT-Neo self-attention whose ``_attn`` is Gaussian Splat Attention unless switched off.

        Why no ``bias`` buffer: GPT-Neo keeps a bool ``max_positions x max_positions`` causal mask per layer
        (4 GiB per layer at 64k positions) and rebuilds it in ``_init_weights``. This class is built with a
        one-position config, holds an empty ``bias`` and computes each call's causal (local: windowed) mask
        for the queries and keys it has, the same values GPT-Neo slices from its buffer. It is marked as
        initialised (``_is_hf_initialized``): it owns no weight, its projections are initialised as usual.
        """

        def __init__(self, config: Any, attention_type: str, layer_id: int | None = None) -> None:
            super().__init__(_one_position(config), attention_type, layer_id)
            self.config = config
            self.drop_position_buffers()

        @property
        def window(self) -> int | None:
            """The sliding window of a local layer (None: a global one)."""
            return int(self.config.window_size) if self.attention_type == "local" else None

        def drop_position_buffers(self) -> None:
            """Free the ``n x n`` ``bias`` (an original module converted in place) and skip its re-initialisation."""
            self.register_buffer("bias", torch.empty(0, dtype=torch.bool, device=self.q_proj.weight.device),
                                 persistent=False)
            self._is_hf_initialized = True

        def _eager(self, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
            """GPT-Neo's own eager attention, its causal mask computed for this call (same values as the
            sliced buffer, so passthrough is the original bit for bit)."""
            query, key = query.to(torch.float32), key.to(torch.float32)
            weights = torch.matmul(query, key.transpose(-1, -2))
            causal = MaskSpec(causal=True, window=self.window).allowed(query.size(-2), key.size(-2), weights.device)
            floor = torch.tensor(torch.finfo(weights.dtype).min, dtype=weights.dtype, device=weights.device)
            weights = torch.where(causal, weights, floor)
            if attention_mask is not None:
                weights = weights + attention_mask
            weights = self.attn_dropout(nn.functional.softmax(weights, dim=-1).to(value.dtype))
            return torch.matmul(weights, value), weights

        def _attn(self, query: Any, key: Any, value: Any, attention_mask: Any = None) -> tuple[Any, Any]:
            layer = self._modules.get("gsa")
            exact = layer is None or layer.passthrough
            if is_padding_row(attention_mask, query.shape[-2]):  # a long input: linear memory (long_inputs)
                spec = MaskSpec(causal=True, key_padding=key_validity(attention_mask))
                if not exact:
                    return layer.attend(query, key, value, spec), None
                out = banded_attention(query, key, value, spec.key_padding, window=self.window)
                if layer is not None and layer.teacher is not None:
                    layer.teacher(query, key, value, spec, out)
                return out, None
            if exact:
                out = self._eager(query, key, value, attention_mask)
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
    padding_row_masks = True  # GPT-Neo's _attn adds the mask to its own causal/local mask

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

    @contextlib.contextmanager
    def building(self, model_config: Any) -> Iterator[None]:
        """While a GSA model is constructed (``from_pretrained``), GPT-Neo's blocks build the bias-free
        :func:`gsa_self_attention_class` instead of ``GPTNeoSelfAttention``: no ``n x n`` buffer is allocated,
        not even for a moment. (A plain GPT-Neo built by another thread meanwhile gets it too, and is the same:
        without a ``gsa`` layer the class computes GPT-Neo's attention exactly.)"""
        from transformers.models.gpt_neo import modeling_gpt_neo

        classes = modeling_gpt_neo.GPT_NEO_ATTENTION_CLASSES
        with _BUILDING:
            original = classes["eager"]
            classes["eager"] = gsa_self_attention_class()
            try:
                yield
            finally:
                classes["eager"] = original

    def default_mode(self, site: Site, params: AdapterParams) -> Mode:
        assert isinstance(params, GPTNeoParams)
        return params.local_layers if site.kind == "local" else params.global_layers

    def default_hybrid_window(self, model: nn.Module) -> int | None:
        return int(model.config.window_size)

    def install(self, model: nn.Module, sites: list[Site], params: AdapterParams) -> None:
        cls = gsa_self_attention_class()
        for site in sites:
            site.module.__class__ = cls
            site.module.drop_position_buffers()
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
