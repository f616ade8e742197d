"""What every model adapter shares: params, the layer sites, conversion, detection and errors.

An adapter is built by the registry from its params model (``GSAConfig.adapter = {name, params}``)
and implements :class:`gsa_core.protocols.ModelAdapter`. A family adapter only says where its attention
modules are (:meth:`HFAdapter.sites`) and how GSA is plugged into them (:meth:`HFAdapter.install`);
everything else (modes per layer, shape checks, banks, the saved config) is here.

Nothing here imports ``transformers`` at import time (the registry loads this module on every query).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from gsa_core.calibration import layer_seed
from gsa_core.config import AdapterSpec, GSAConfig
from gsa_core.errors import ConfigError, GSAError
from gsa_core.registry import StrategyParams, get_registry
from gsa_plugins.adapters.layers import GSALayer, Mode
from gsa_plugins.adapters.recall_cache import recall_layer_problem

if TYPE_CHECKING:
    from gsa_core.bank import SplatBank
    from gsa_core.calibration import AttentionLayer
    from gsa_plugins.adapters.past import DecodePlan

INSTALL_HINT = "pip install gaussian-splat-attention"
MODEL_TYPE_PREFIX = "gsa_"
"""A converted model's ``config.model_type`` is this prefix plus the original one (``gsa_gpt_neo``)."""


class UnsupportedModelError(GSAError, TypeError):
    """No adapter (or not the requested one) supports this model."""


class ModelMismatchError(ConfigError):
    """A GSA config that does not fit the model (head dim, heads, layer count, layer indices)."""


# ----------------------------------------------------------------------------- params
class ModelShape(StrategyParams):
    """The attention shape a config was made for; ``convert`` records it and checks it on reuse."""

    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)


class AdapterParams(StrategyParams):
    """Settings every adapter has. Family adapters add which layer kinds get GSA."""

    passthrough: bool = Field(
        False, description="GSA switched off: every layer computes the original attention exactly (banks unused)"
    )
    layers: dict[int, Mode] = Field(
        default_factory=dict, description="per-layer mode overrides by layer index: gsa | exact | hybrid"
    )
    hybrid_window: int | None = Field(
        None, ge=1, description="keys per query computed exactly in hybrid layers (default: the family's)"
    )
    shape: ModelShape | None = Field(
        None, description="attention shape the config was made for; filled in by convert, checked against the model"
    )


@dataclass
class Site:
    """One attention module an adapter can convert."""

    name: str  # module path, e.g. "transformer.h.0.attn.attention"
    module: nn.Module
    layer: int  # layer index
    kind: str  # "global" | "local" | "self" | "cross"
    n_heads: int
    head_dim: int
    scaling: float  # the host's logit factor: q·k * scaling
    causal: bool
    window: int | None = None  # the host's own sliding window (GPT-Neo local layers)


@dataclass
class PositionTable:
    """Where a model keeps its learned absolute position embeddings (``HFAdapter.position_table``)."""

    name: str  # module path, e.g. "transformer.wpe"
    module: nn.Embedding
    config_field: str = "max_position_embeddings"  # the model config's count of positions

    @property
    def rows(self) -> int:
        return int(self.module.num_embeddings)


def describe_model(model: Any) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    suffix = f" (model_type {model_type!r})" if model_type else ""
    return f"{type(model).__name__}{suffix}"


def original_model_type(model: Any) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX):
        return model_type[len(MODEL_TYPE_PREFIX):]
    return model_type


def is_converted(model: Any) -> bool:
    """Whether ``model`` is a GSA-converted Hugging Face model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    return getattr(config, "gsa", None) is not None and str(model_type).startswith(MODEL_TYPE_PREFIX)


def as_gsa_config(config: GSAConfig | Mapping[str, Any] | str | Path | None) -> GSAConfig:
    if config is None:
        return GSAConfig()
    if isinstance(config, GSAConfig):
        return config
    if isinstance(config, (str, Path)):
        return GSAConfig.from_file(config)
    if isinstance(config, Mapping):
        return GSAConfig.from_dict(config)
    raise TypeError(f"config must be a GSAConfig, a mapping or a config file path, got {type(config).__name__}")


@contextlib.contextmanager
def _own_rng() -> Iterator[None]:
    """Bank construction draws from torch's global generator; keep the caller's stream untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


def _own_config(model: nn.Module) -> None:
    """Give the model its own copy of its config before converting: the caller's config object (often
    shared with other models built from it) must not become a GSA config. Inner modules may hold another
    object of the same config class (composite models copy sub-configs): they get the copy too, so every
    module reads the converted config."""
    old = getattr(model, "config", None)
    if old is None:
        return
    new = copy.deepcopy(old)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is old or (config is not None and type(config) is type(old)):
            module.config = new


# ----------------------------------------------------------------------------- the adapter base
class HFAdapter:
    """Base of the Hugging Face model adapters (see the module docstring)."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    params_model: ClassVar[type[AdapterParams]] = AdapterParams
    #: ``from_pretrained(attn_implementation=...)`` the original model is loaded with so conversion can wrap
    #: its attention (None: whatever transformers picks)
    load_attn_implementation: ClassVar[str | None] = None
    #: LoRA target modules (peft ``target_modules``); empty: the weight-bearing children of the sites' modules
    lora_target_modules: ClassVar[tuple[str, ...]] = ()
    #: Whether the converted attention modules take a ``[B, 1, 1, n]`` padding row as the mask of ``n``
    #: queries and apply causality and windows themselves (the linear-memory forward of long inputs,
    #: ``gsa_plugins.adapters.long_inputs``); otherwise long inputs get the model's own masks
    padding_row_masks: ClassVar[bool] = False

    def __init__(self, params: AdapterParams | None = None) -> None:
        self.params = params if params is not None else self.params_model()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    # ------------------------------------------------------------ family hooks
    def sites(self, model: nn.Module) -> list[Site]:
        """Every attention module of ``model`` this adapter can convert, in model order."""
        raise NotImplementedError

    def default_mode(self, site: Site, params: AdapterParams) -> Mode:
        """The mode of a site no ``layers`` override names."""
        return "gsa"

    def default_hybrid_window(self, model: nn.Module) -> int | None:
        return None

    def resolve(self, model: nn.Module, params: AdapterParams) -> AdapterParams:
        """Fill in settings taken from the model (family hook; call super)."""
        return params

    def install(self, model: nn.Module, sites: list[Site], params: AdapterParams) -> None:
        """Route the model's attention through the attached :class:`GSALayer` modules (family hook)."""
        raise NotImplementedError

    def attention_layers(self, model: nn.Module) -> list[AttentionLayer]:
        """The converted layers as ``gsa_core.calibration.AttentionLayer`` descriptions.

        Default: the ``q_in``/``k_in`` capture points of each attached :class:`GSALayer` (the vectors
        the layer actually attends with, after rotary embeddings or head sharing); needs a converted
        model. Families whose projections are the attention's inputs override this.
        """
        from gsa_core.calibration import AttentionLayer

        layers = []
        for name, layer in gsa_layers(model).items():
            layers.append(AttentionLayer(name=name, query=layer.q_in, key=layer.k_in, n_heads=layer.n_heads,
                                         head_dim=layer.head_dim, scaling=layer.scaling))
        if not layers:
            raise UnsupportedModelError(
                f"{describe_model(model)} has no GSA layers yet: convert it first (capture points live in the "
                "attached GSA layers)"
            )
        return layers

    # ------------------------------------------------------------ family facts (gsa_core.protocols.ModelAdapter)
    def attn_implementation(self, model_config: Any) -> str | dict[str, str] | None:
        """The attention implementation to load the original model with (:attr:`load_attn_implementation`)."""
        return self.load_attn_implementation

    def lora_targets(self, model: nn.Module) -> list[str]:
        """Module names for LoRA: :attr:`lora_target_modules`, else every child of an attention module that
        holds a 2-D weight (its projections: ``nn.Linear``, or transformers' ``Conv1D``), in model order."""
        if self.lora_target_modules:
            return list(self.lora_target_modules)
        names: dict[str, None] = {}
        for site in self.sites(model):
            for child_name, child in site.module.named_children():
                weight = getattr(child, "weight", None)
                if child_name != "gsa" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                    names[child_name] = None
        return list(names)

    def hybrid_params(self, model: nn.Module, params: Mapping[str, Any], window: int) -> dict[str, Any]:
        """``params`` with every self-attention layer hybrid over ``window`` keys (explicit ``layers`` win)."""
        layers = sorted({site.layer for site in self.sites(model) if site.kind != "cross"})
        out = dict(params)
        explicit = {int(i): mode for i, mode in (params.get("layers") or {}).items()}  # JSON keeps keys as strings
        out.update(hybrid_window=window, layers={**{i: "hybrid" for i in layers}, **explicit})
        return out

    def forward_inputs(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A token batch is the forward's keyword arguments as it is."""
        return dict(batch)

    # ------------------------------------------------------------ positions (gsa_plugins.adapters.positions)
    def building(self, model_config: Any) -> contextlib.AbstractContextManager[None]:
        """A context the GSA model class's ``__init__`` (``from_pretrained``) constructs the original model in:
        a family whose modules would allocate what GSA does not need swaps them here (family hook)."""
        return contextlib.nullcontext()

    def position_table(self, model: nn.Module) -> PositionTable | None:
        """The model's learned absolute position table (what a ``positions`` strategy extends), or None when
        it has none (rotary or relative positions: nothing to extend, no limit to check). Family hook."""
        return None

    def positions_resized(self, model: nn.Module, n_positions: int) -> None:
        """Called after the position table was replaced by one of ``n_positions`` rows: resize whatever else
        the family sizes by positions (family hook; the config field is already updated)."""

    # ------------------------------------------------------------ decoding (gsa_plugins.adapters.decoding)
    def decode_plan(self, model: nn.Module) -> list[DecodePlan]:
        """How each attention layer of a converted ``model`` decodes from a stored past, in layer order (what
        the recurrent generation cache is built from). Families that support it override this."""
        raise UnsupportedModelError(
            f"adapter {self.name!r} has no decode plan for {describe_model(model)}: the recurrent generation "
            "cache is not supported for this family; generate() uses transformers' own cache"
        )

    # ------------------------------------------------------------ ModelAdapter
    def matches(self, model: Any) -> bool:
        if not isinstance(model, nn.Module):
            return False
        return original_model_type(model) in self.model_types

    def params_for(self, config: GSAConfig) -> AdapterParams:
        """This adapter's params: the config's when it names this adapter, else the adapter's own."""
        if config.adapter is None:
            return self.params
        if config.adapter.name != self.name:
            raise ConfigError(
                f"the GSA config selects adapter {config.adapter.name!r}, but convert was called with adapter "
                f"{self.name!r}; drop one of them"
            )
        return self.params_model.model_validate(config.adapter.params)

    def mode(self, site: Site, params: AdapterParams) -> Mode:
        if site.kind == "cross":
            return self.default_mode(site, params)
        return params.layers.get(site.layer, self.default_mode(site, params))

    def check(self, model: nn.Module, sites: list[Site], params: AdapterParams, config: GSAConfig) -> None:
        """Raise :class:`ModelMismatchError` naming what does not fit."""
        what = describe_model(model)
        if not sites:
            raise UnsupportedModelError(f"adapter {self.name!r} found no attention modules it can convert in {what}")
        layer_ids = sorted({s.layer for s in sites})
        n_layers = len(layer_ids)
        bad = sorted(i for i in params.layers if i not in layer_ids)
        if bad:
            raise ModelMismatchError(
                f"adapter params 'layers' name layer(s) {bad}, but {what} has {n_layers} layers "
                f"(indices {layer_ids[0]}..{layer_ids[-1]})"
            )
        shapes = {(s.n_heads, s.head_dim) for s in sites}
        if params.shape is not None:
            want = params.shape
            have = ModelShape(n_layers=n_layers, n_heads=sites[0].n_heads, head_dim=sites[0].head_dim)
            problems = [f"{label} {getattr(want, field)} vs {getattr(have, field)}"
                        for field, label in (("head_dim", "head dim"), ("n_heads", "heads"), ("n_layers", "layers"))
                        if getattr(want, field) != getattr(have, field)]
            if problems:
                raise ModelMismatchError(
                    f"this GSA config does not fit {what}: it was made for head dim {want.head_dim}, "
                    f"{want.n_heads} heads, {want.n_layers} layers; the model has head dim {have.head_dim}, "
                    f"{have.n_heads} heads, {have.n_layers} layers (mismatch: {'; '.join(problems)}). "
                    "Remove adapter.params.shape to convert this model with it"
                )
        if len(shapes) > 1:
            raise ModelMismatchError(f"{what} mixes attention shapes {sorted(shapes)}; one GSA config cannot fit")
        recall = recall_layer_problem(config, [(s.layer, self.mode(s, params), s.causal and s.kind != "cross",
                                                s.window) for s in sites])
        if recall is not None:
            raise ModelMismatchError(f"{what}: {recall}")
        for site in sites:
            mode = self.mode(site, params)
            if mode == "hybrid" and site.kind == "cross":
                raise ModelMismatchError(
                    f"layer {site.layer} ({site.name}) is cross-attention: hybrid attention (an exact window of "
                    "nearby keys) needs self-attention; use 'gsa' or 'exact'"
                )
            if mode == "hybrid" and params.hybrid_window is None:
                raise ModelMismatchError(
                    f"layer {site.layer} ({site.name}) is hybrid but adapter params set no hybrid_window"
                )
            if mode == "gsa" and site.window is not None and not params.passthrough:
                backend = config.backend.build()
                if "window" not in backend.supported_masks:
                    raise ModelMismatchError(
                        f"layer {site.layer} ({site.name}) keeps its sliding window of {site.window} in 'gsa' mode, "
                        f"a mask kind backend {config.backend.name!r} cannot serve; use backend 'dense' or 'auto', "
                        "or set that layer kind to 'exact' or 'hybrid'"
                    )

    def _resolved(self, model: nn.Module, params: AdapterParams) -> AdapterParams:
        sites = self.sites(model)
        update: dict[str, Any] = {}
        if params.hybrid_window is None:
            default = self.default_hybrid_window(model)
            if default is not None:
                update["hybrid_window"] = default
        if params.shape is None and sites:
            update["shape"] = ModelShape(n_layers=len({s.layer for s in sites}), n_heads=sites[0].n_heads,
                                         head_dim=sites[0].head_dim)
        params = params.model_copy(update=update) if update else params
        return self.resolve(model, params)

    def convert(self, model: Any, config: GSAConfig | Mapping[str, Any] | str | Path | None = None) -> Any:
        """Convert ``model`` in place (and return it): attach splat banks, route attention through GSA.

        Every original weight is kept; the GSA config (with this adapter's resolved params) is stored
        in ``model.config.gsa`` and the model's class becomes its GSA subclass, so ``save_pretrained``
        / ``from_pretrained`` round-trip it exactly.
        """
        cfg = as_gsa_config(config)
        if not self.matches(model):
            raise UnsupportedModelError(
                f"adapter {self.name!r} does not support {describe_model(model)}; it converts model types "
                f"{', '.join(self.model_types)}. {available_adapters_text()}"
            )
        if is_converted(model):
            raise UnsupportedModelError(
                f"{describe_model(model)} is already GSA-converted; use set_passthrough() to switch GSA off or "
                "convert the original model"
            )
        params = self._resolved(model, self.params_for(cfg))
        sites = self.sites(model)
        self.check(model, sites, params, cfg)
        _own_config(model)
        cfg = cfg.model_copy(update={"adapter": AdapterSpec(name=self.name, params=params.model_dump(mode="json"))})
        self._attach(model, sites, params, cfg, initialize=True)
        from gsa_plugins.adapters import hf

        hf.finalize(model, cfg)
        return model

    def apply(self, model: nn.Module, config: GSAConfig) -> None:
        """Rebuild the GSA structure of a model whose config already carries ``config`` (``from_pretrained``)."""
        params = self.params_for(config)
        sites = self.sites(model)
        self.check(model, sites, params, config)
        self._attach(model, sites, params, config, initialize=False)

    def _attach(self, model: nn.Module, sites: list[Site], params: AdapterParams, cfg: GSAConfig, *,
                initialize: bool) -> None:
        for site in sites:
            mode = self.mode(site, params)
            if mode == "exact":
                continue
            weight = next(site.module.parameters(), None)
            with _own_rng():
                layer = GSALayer(
                    site.n_heads, site.head_dim, cfg, mode=mode, scaling=site.scaling, causal=site.causal,
                    window=site.window, hybrid_window=params.hybrid_window, passthrough=params.passthrough,
                    layer=site.layer,
                )
                if initialize:
                    layer.initialize(generator=torch.Generator().manual_seed(layer_seed(cfg.seed, site.name)))
            if weight is not None:
                layer.to(weight.device)
            site.module.gsa = layer
        self.install(model, sites, params)


# ----------------------------------------------------------------------------- converted models
def only_converted(model: nn.Module, layers: list[AttentionLayer]) -> list[AttentionLayer]:
    """On a converted model keep the layers that have a splat bank (the ones calibration can fill)."""
    if not is_converted(model):
        return layers
    have = gsa_layers(model)
    return [layer for layer in layers if layer.name in have]


def gsa_layers(model: nn.Module) -> dict[str, GSALayer]:
    """Every attached :class:`GSALayer`, keyed by its host attention module's path."""
    return {name.removesuffix(".gsa"): m for name, m in model.named_modules() if isinstance(m, GSALayer)}


def banks(model: nn.Module) -> dict[str, SplatBank]:
    """Every splat bank, keyed like :func:`gsa_layers` (and like the adapter's ``attention_layers``)."""
    return {name: layer.bank for name, layer in gsa_layers(model).items()}


def set_passthrough(model: nn.Module, enabled: bool = True) -> None:
    """Switch GSA off (``True``: original attention, exactly) or on, also in the config that is saved."""
    for layer in gsa_layers(model).values():
        layer.passthrough = enabled
    seen: set[int] = set()
    for module in model.modules():  # every GSA config in the model (composite models hold several)
        config = getattr(module, "config", None)
        data = getattr(config, "gsa", None)
        if id(data) in seen or not isinstance(data, dict) or not isinstance(data.get("adapter"), dict):
            continue
        seen.add(id(data))
        data["adapter"].setdefault("params", {})["passthrough"] = enabled


def adapter_for(model: Any) -> HFAdapter:
    """The adapter of a converted model (from its config), or the detected one for an original model."""
    if is_converted(model):
        cfg = GSAConfig.from_model_config(model.config)
        assert cfg.adapter is not None
        return get_registry().build("adapter", cfg.adapter.name, cfg.adapter.params)
    return detect_adapter(model)


def available_adapters_text() -> str:
    registry = get_registry()
    parts = []
    for comp in registry.components("adapter"):
        types = getattr(comp.factory, "model_types", ())
        parts.append(f"{comp.name} ({', '.join(types)})" if types else comp.name)
    listed = ", ".join(parts) if parts else "(none registered)"
    return (f"Available adapters: {listed}. A new family needs an adapter plugin "
            "(see examples/gsa-example-adapter).")


def adapter_for_config(model_config: Any) -> Any | None:
    """The first registered adapter (by name) converting ``model_config.model_type``, or None: what an
    original model needs can be asked before it is loaded."""
    model_type = getattr(model_config, "model_type", None)
    registry = get_registry()
    for comp in registry.components("adapter"):
        if model_type in getattr(comp.factory, "model_types", ()):
            return registry.build("adapter", comp.name)
    return None


def load_kwargs(model_config: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments an original model needs for its adapter to convert it (the
    adapter's :meth:`~HFAdapter.attn_implementation`); empty when no adapter knows the model type."""
    adapter = adapter_for_config(model_config)
    implementation = None if adapter is None else adapter.attn_implementation(model_config)
    return {} if implementation is None else {"attn_implementation": implementation}


def detect_adapter(model: Any) -> Any:
    """The first registered adapter (by name) whose ``matches`` accepts ``model``."""
    registry = get_registry()
    for comp in registry.components("adapter"):
        adapter = registry.build("adapter", comp.name)
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(f"no GSA adapter supports {describe_model(model)}. {available_adapters_text()}")


def convert(model: Any, config: GSAConfig | Mapping[str, Any] | str | Path | None = None, *,
            adapter: str | None = None) -> Any:
    """Convert a Hugging Face model to GSA in place and return it.

    The adapter is ``adapter`` if given, else the config's ``adapter`` entry, else detected from the
    model. ``config`` is a :class:`GSAConfig`, a mapping or a TOML/JSON/YAML file.
    """
    cfg = as_gsa_config(config)
    registry = get_registry()
    name = adapter or (cfg.adapter.name if cfg.adapter is not None else None)
    if name is None:
        chosen = detect_adapter(model)
    else:
        params = cfg.adapter.params if cfg.adapter is not None and cfg.adapter.name == name else None
        chosen = registry.build("adapter", name, params)
        if not chosen.matches(model):
            raise UnsupportedModelError(
                f"adapter {name!r} does not support {describe_model(model)}. {available_adapters_text()}"
            )
        if cfg.adapter is not None and cfg.adapter.name != name:
            cfg = cfg.model_copy(update={"adapter": None})
    return chosen.convert(model, cfg)
