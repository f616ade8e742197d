"""Adapters for families that call attention through transformers' ``AttentionInterface``.

Conversion registers an attention function named ``gsa`` (and a mask function of the same name that
builds exactly the mask of the implementation it wraps), sets ``config._attn_implementation = "gsa"``
and attaches a :class:`GSALayer` as the ``gsa`` submodule of every converted attention module. The
function runs GSA where a layer has one, and otherwise (exact layers, passthrough) calls the very
function the model used before (``eager_attention_forward`` of the model's file, or ``sdpa``) with the
very same arguments, so passthrough reproduces the original outputs bit for bit.

A family adapter is a few lines: its model types and its attention module class names (see
``bert.py`` and ``llama.py``).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from gsa_plugins.adapters.base import AdapterParams, HFAdapter, ModelMismatchError, Site, describe_model
from gsa_plugins.adapters.layers import GSALayer, Mode

GSA_IMPLEMENTATION = "gsa"
BASE_IMPLEMENTATIONS = ("eager", "sdpa")


class InterfaceParams(AdapterParams):
    attn_implementation: Literal["eager", "sdpa"] | None = Field(
        None, description="the original attention the converted model wraps (passthrough and exact layers); "
                          "default: the model's at conversion",
    )
    self_attention: Mode = Field("gsa", description="mode of the self-attention layers")
    cross_attention: Literal["gsa", "exact"] = Field("gsa", description="mode of the cross-attention layers")


def base_implementation(config: Any) -> str:
    """The implementation a converted model wraps (stored in its GSA config)."""
    data = getattr(config, "gsa", None)
    try:
        value = data["adapter"]["params"]["attn_implementation"]
    except (TypeError, KeyError):
        value = None
    return value if value in BASE_IMPLEMENTATIONS else "sdpa"


_base_functions: dict[tuple[type, str], Any] = {}


def base_function(module: nn.Module) -> Any:
    """The attention function ``module`` called before conversion (same lookup as the modeling code)."""
    base = base_implementation(getattr(module, "config", None))
    key = (type(module), base)
    fn = _base_functions.get(key)
    if fn is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        modeling = sys.modules[type(module).__module__]
        eager = getattr(modeling, "eager_attention_forward", None)
        interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
        if base == "eager" and eager is None:
            raise RuntimeError(f"{modeling.__name__} defines no eager_attention_forward to wrap")
        fn = interface.get_interface(base, eager)
        _base_functions[key] = fn
    return fn


def _repeat_heads(x: Tensor, n_heads: int) -> Tensor:
    """Grouped-query attention: repeat each key/value head for the query heads that share it."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def gsa_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """The ``gsa`` entry of ``AttentionInterface``: ``[B, H, n, d]`` in, ``([B, n_q, H, d], None)`` out."""
    layer = module._modules.get("gsa")
    is_causal = kwargs.get("is_causal")
    if layer is None or layer.passthrough:
        if layer is not None and layer.capturing():
            layer.capture(query, _repeat_heads(key, query.shape[1]))
        out = base_function(module)(module, query, key, value, attention_mask, **kwargs)
        if layer is not None and layer.teacher is not None:
            n_heads = query.shape[1]
            layer.tap_teacher(query, _repeat_heads(key, n_heads), _repeat_heads(value, n_heads), attention_mask,
                              out[0].transpose(1, 2), causal=layer.causal if is_causal is None else bool(is_causal))
        return out
    assert isinstance(layer, GSALayer)
    n_heads = query.shape[1]
    key, value = _repeat_heads(key, n_heads), _repeat_heads(value, n_heads)
    layer.capture(query, key)
    causal = layer.causal if is_causal is None else bool(is_causal)
    batch, _, n_q, _ = query.shape
    spec = layer.masks.spec(attention_mask, batch, n_q, key.shape[-2], causal=causal)
    out = layer.attend(query, key, value, spec)
    return out.transpose(1, 2).contiguous(), None


def gsa_mask(*args: Any, **kwargs: Any) -> Any:
    """The ``gsa`` entry of ``AttentionMaskInterface``: the mask of the wrapped implementation, exactly."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base = base_implementation(kwargs.get("config"))
    return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)


def ensure_registered() -> None:
    """Register ``gsa`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(GSA_IMPLEMENTATION, gsa_attention_forward)
    AttentionMaskInterface.register(GSA_IMPLEMENTATION, gsa_mask)


class InterfaceAdapter(HFAdapter):
    """Base of the ``AttentionInterface`` family adapters: subclasses name model types and module classes."""

    params_model = InterfaceParams
    load_attn_implementation = "sdpa"  # either base implementation is wrapped exactly; sdpa is the faster teacher
    attention_classes: ClassVar[tuple[str, ...]] = ()
    cross_attention_classes: ClassVar[tuple[str, ...]] = ()

    def is_cross(self, module: nn.Module) -> bool:
        if type(module).__name__ in self.cross_attention_classes:
            return True
        return bool(getattr(module, "is_cross_attention", False))

    def n_heads(self, module: nn.Module, model: nn.Module) -> int:
        for attr in ("num_attention_heads", "num_heads"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
        return int(model.config.num_attention_heads)

    def head_dim(self, module: nn.Module, model: nn.Module) -> int:
        for attr in ("attention_head_size", "head_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
        return int(model.config.hidden_size // self.n_heads(module, model))

    def sites(self, model: nn.Module) -> list[Site]:
        names = set(self.attention_classes) | set(self.cross_attention_classes)
        sites: list[Site] = []
        order = {"self": 0, "cross": 0}
        for name, module in model.named_modules():
            if type(module).__name__ not in names:
                continue
            cross = self.is_cross(module)
            kind = "cross" if cross else "self"
            idx = getattr(module, "layer_idx", None)
            layer = idx if isinstance(idx, int) else order[kind]
            order[kind] += 1
            head_dim = self.head_dim(module, model)
            scaling = getattr(module, "scaling", None)
            sites.append(Site(
                name=name, module=module, layer=layer, kind=kind, n_heads=self.n_heads(module, model),
                head_dim=head_dim, scaling=float(scaling) if scaling is not None else head_dim**-0.5,
                causal=not cross and bool(getattr(module, "is_causal", False)),
            ))
        return sites

    def default_mode(self, site: Site, params: AdapterParams) -> Mode:
        assert isinstance(params, InterfaceParams)
        return params.cross_attention if site.kind == "cross" else params.self_attention

    def resolve(self, model: nn.Module, params: AdapterParams) -> AdapterParams:
        assert isinstance(params, InterfaceParams)
        if params.attn_implementation is not None:
            return params
        current = getattr(model.config, "_attn_implementation", None) or "eager"
        if current not in BASE_IMPLEMENTATIONS:
            raise ModelMismatchError(
                f"{describe_model(model)} uses attn_implementation {current!r}; GSA conversion wraps one of "
                f"{', '.join(BASE_IMPLEMENTATIONS)}: load the model with attn_implementation='sdpa' (or 'eager'), "
                "or set adapter.params.attn_implementation"
            )
        return params.model_copy(update={"attn_implementation": current})

    def install(self, model: nn.Module, sites: list[Site], params: AdapterParams) -> None:
        ensure_registered()
        model.config._attn_implementation = GSA_IMPLEMENTATION
        for site in sites:  # each module dispatches on its own config: it must be the converted one
            if getattr(site.module, "config", model.config) is not model.config:
                raise ModelMismatchError(
                    f"{site.name} reads another config object than {describe_model(model)}; it would not dispatch "
                    "to GSA attention"
                )
