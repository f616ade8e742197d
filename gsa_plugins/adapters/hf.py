"""Hugging Face glue: GSA model classes, ``from_pretrained``/``save_pretrained``, auto-class registration.

A converted model becomes an instance of a GSA subclass of its own class (``GPTNeoForCausalLM`` ->
``GSAGPTNeoForCausalLM``) with a GSA subclass of its config class whose ``model_type`` is
``gsa_<original>`` (``gsa_gpt_neo``). The subclass's ``__init__`` runs the original one and then
attaches the GSA layers described by ``config.gsa``, so ``from_pretrained`` rebuilds the exact
structure and loads every weight, splat banks included.

Loading a saved GSA checkpoint:

- ``gsa_plugins.adapters.load_converted(path)``: one call, nothing else to import;
- ``AutoModel*.from_pretrained(path)`` after :func:`register_auto_classes` (or after any conversion
  or ``load_converted`` in the process);
- ``AutoModel*.from_pretrained(path, trust_remote_code=True)`` in any process: the checkpoint's
  ``auto_map`` points to a small stub (``gsa_checkpoint.py``) that imports this package, or fails with
  a message saying ``pip install gaussian-splat-attention`` when it is not installed. Without
  ``trust_remote_code`` transformers refuses the unknown ``gsa_*`` model type rather than silently
  loading the model without its GSA layers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from gsa_core.config import GSAConfig
from gsa_core.errors import ConfigError
from gsa_core.registry import get_registry
from gsa_plugins.adapters.base import INSTALL_HINT, MODEL_TYPE_PREFIX, UnsupportedModelError
from gsa_plugins.adapters.interface import ensure_registered

STUB_MODULE = "gsa_checkpoint"
ensure_registered()  # the ``gsa`` attention function exists wherever GSA classes can be built
_lock = threading.RLock()
_config_classes: dict[type, type] = {}
_model_classes: dict[type, type] = {}


# ----------------------------------------------------------------------------- classes
def _auto_classes() -> list[type[_BaseAutoModelClass]]:
    found = []
    for name in sorted(dir(modeling_auto)):
        obj = getattr(modeling_auto, name)
        if (isinstance(obj, type) and issubclass(obj, _BaseAutoModelClass) and name.startswith("AutoModel")
                and getattr(obj, "_model_mapping", None) is not None):
            found.append(obj)
    return found


def _mapped_names(model_type: str) -> dict[str, str]:
    """``{auto class name: model class name}`` for every auto class that maps ``model_type``."""
    out = {}
    for auto in _auto_classes():
        name = auto._model_mapping._model_mapping.get(model_type)
        if isinstance(name, str):
            out[auto.__name__] = name
    return out


def gsa_config_class(original: type) -> type:
    """The GSA subclass of a config class (``model_type`` ``gsa_<original>``), registered with AutoConfig."""
    if getattr(original, "model_type", "").startswith(MODEL_TYPE_PREFIX):
        return original
    with _lock:
        cls = _config_classes.get(original)
        if cls is None:
            model_type = MODEL_TYPE_PREFIX + original.model_type
            cls = type(f"GSA{original.__name__}", (original,), {
                "model_type": model_type,
                "__module__": __name__,
                "__doc__": f"{original.__name__} of a Gaussian Splat Attention model (GSA config in ``gsa``).",
            })
            _config_classes[original] = cls
            globals()[cls.__name__] = cls
            AutoConfig.register(model_type, cls, exist_ok=True)
        return cls


def _gsa_init(self: PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
    type(self)._gsa_original.__init__(self, config, *args, **kwargs)
    apply_from_config(self)


def _gsa_save_pretrained(self: PreTrainedModel, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    original = type(self)._gsa_original
    self.config.auto_map = checkpoint_auto_map(original.config_class.model_type)
    result = original.save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        write_stub(Path(save_directory), original.config_class.model_type)
    return result


def _gsa_prepare_cache_for_generation(self: PreTrainedModel, generation_config: Any, model_kwargs: dict,
                                      *args: Any, **kwargs: Any) -> Any:
    """``generate()`` without a cache of the caller's: the default generation cache a plugin registered
    (kind ``cache``, asked in name order; ``gsa_generate`` registers the recurrent GSA cache) for the first
    that supports the model; ``cache_implementation="dynamic"`` (or any other) keeps transformers' choice."""
    if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
            and generation_config.cache_implementation is None and not generation_config.is_assistant):
        registry = get_registry()
        for comp in registry.components("cache"):
            factory = registry.build("cache", comp.name)
            if factory.supports(self):
                model_kwargs["cache"] = factory.create(self)
                return None
    return type(self)._gsa_original._prepare_cache_for_generation(self, generation_config, model_kwargs,
                                                                   *args, **kwargs)


def gsa_model_class(original: type) -> type:
    """The GSA subclass of a Hugging Face model class, registered with every auto class mapping the original."""
    if getattr(original, "_gsa_original", None) is not None:
        return original
    with _lock:
        cls = _model_classes.get(original)
        if cls is not None:
            return cls
        config_cls = gsa_config_class(original.config_class)
        namespace = {
            "config_class": config_cls,
            "_gsa_original": original,
            "__init__": _gsa_init,
            "save_pretrained": _gsa_save_pretrained,
            "__module__": __name__,
            "__doc__": f"{original.__name__} with Gaussian Splat Attention (see ``config.gsa``).",
        }
        if hasattr(original, "_prepare_cache_for_generation"):
            namespace["_prepare_cache_for_generation"] = _gsa_prepare_cache_for_generation
        cls = type(f"GSA{original.__name__}", (original,), namespace)
        _model_classes[original] = cls
        globals()[cls.__name__] = cls
        model_type = original.config_class.model_type
        for auto in _auto_classes():
            if auto._model_mapping._model_mapping.get(model_type) == original.__name__:
                auto.register(config_cls, cls, exist_ok=True)
        return cls


def register_family(model_type: str) -> dict[str, type]:
    """Create and register the GSA config and model classes of one original ``model_type``.

    Returns ``{class name: class}`` (what a checkpoint stub exports).
    """
    config_cls = CONFIG_MAPPING[model_type]
    out = {gsa_config_class(config_cls).__name__: gsa_config_class(config_cls)}
    for class_name in _mapped_names(model_type).values():
        original = getattr(transformers, class_name, None)
        if isinstance(original, type):
            cls = gsa_model_class(original)
            out[cls.__name__] = cls
    return out


def register_auto_classes() -> None:
    """Register the GSA classes of every family a registered adapter supports with transformers' auto
    classes, so ``AutoModel*.from_pretrained`` loads GSA checkpoints of those families."""
    for comp in get_registry().components("adapter"):
        for model_type in getattr(comp.factory, "model_types", ()):
            register_family(model_type)


checkpoint_classes = register_family  # the name the checkpoint stub imports


def __getattr__(name: str) -> type:
    """``GSA<Class>`` created on first access (so pickles and stubs can name GSA classes in a fresh process)."""
    original = getattr(transformers, name[len("GSA"):], None) if name.startswith("GSA") else None
    if isinstance(original, type) and issubclass(original, PreTrainedModel):
        return gsa_model_class(original)
    if isinstance(original, type) and getattr(original, "model_type", None):
        return gsa_config_class(original)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply_from_config(model: nn.Module) -> None:
    """Attach the GSA layers that ``model.config.gsa`` describes (the GSA classes' ``__init__``)."""
    try:
        cfg = GSAConfig.from_model_config(model.config)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}. A checkpoint whose adapter comes from a plugin needs that plugin installed"
        ) from exc
    if cfg.adapter is None:
        raise ConfigError("this GSA model config names no adapter (config.gsa.adapter is null)")
    adapter = get_registry().build("adapter", cfg.adapter.name, cfg.adapter.params)
    adapter.apply(model, cfg)


def finalize(model: nn.Module, cfg: GSAConfig) -> None:
    """After conversion: store the config and switch the model and its config to their GSA classes."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel")
    original_type = model.config.model_type
    model.config.gsa = cfg.to_dict()
    model.config.__class__ = gsa_config_class(type(model.config))
    # transformers 5 keeps the loaded ``model_type`` on the config instance, shadowing the GSA class's.
    model.config.__dict__.pop("model_type", None)
    model.__class__ = gsa_model_class(type(model))
    register_family(original_type)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_auto_map(model_type: str) -> dict[str, str]:
    config_cls = CONFIG_MAPPING[model_type]
    auto_map = {"AutoConfig": f"{STUB_MODULE}.GSA{config_cls.__name__}"}
    for auto_name, class_name in _mapped_names(model_type).items():
        auto_map[auto_name] = f"{STUB_MODULE}.GSA{class_name}"
    return auto_map


_STUB = '''"""Written by gaussian-splat-attention: this checkpoint uses Gaussian Splat Attention (GSA).

Loading it needs the GSA package ({hint}). With it installed, any of these works:
``gsa_plugins.adapters.load_converted(path)``, or ``AutoModel*.from_pretrained(path, trust_remote_code=True)``.
"""

try:
    from gsa_plugins.adapters.hf import checkpoint_classes
except ImportError as exc:
    raise ImportError(
        "This checkpoint was converted to Gaussian Splat Attention (GSA) and needs the GSA package to load: "
        "{hint}"
    ) from exc

globals().update(checkpoint_classes({model_type!r}))
'''


def write_stub(directory: Path, model_type: str) -> Path:
    path = directory / f"{STUB_MODULE}.py"
    path.write_text(_STUB.format(hint=INSTALL_HINT, model_type=model_type), encoding="utf-8")
    return path


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a local checkpoint folder, or of a hub id via transformers."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    from transformers import PretrainedConfig

    data, _ = PretrainedConfig.get_config_dict(str(path))
    return data


def load_converted(path: str | Path, *, model_class: type | None = None, **kwargs: Any) -> PreTrainedModel:
    """Load a saved GSA checkpoint (``from_pretrained`` of its GSA class); ``kwargs`` go to ``from_pretrained``.

    ``model_class`` picks another head (e.g. ``transformers.GPTNeoModel``); by default the class the
    checkpoint was saved from.
    """
    data = read_checkpoint_config(path)
    model_type = str(data.get("model_type", ""))
    if model_type == "encoder-decoder" and data.get("gsa") is not None:
        from transformers import EncoderDecoderModel

        for part in ("encoder", "decoder"):
            sub_type = str(data.get(part, {}).get("model_type", ""))
            if sub_type.startswith(MODEL_TYPE_PREFIX):
                register_family(sub_type[len(MODEL_TYPE_PREFIX):])
        return EncoderDecoderModel.from_pretrained(path, **kwargs)
    if data.get("gsa") is None or not model_type.startswith(MODEL_TYPE_PREFIX):
        raise ConfigError(
            f"{path} is not a GSA checkpoint (its config.json has no 'gsa' entry); convert the model first "
            f"(gsa convert SRC DST --config FILE, or gsa_plugins.adapters.convert)"
        )
    register_family(model_type[len(MODEL_TYPE_PREFIX):])
    if model_class is None:
        arch = (data.get("architectures") or [None])[0]
        name = arch[len("GSA"):] if isinstance(arch, str) and arch.startswith("GSA") else arch
        original = getattr(transformers, name, None) if name else None
        if not isinstance(original, type):
            from transformers import AutoModel

            return AutoModel.from_pretrained(path, **kwargs)
        model_class = original
    return gsa_model_class(model_class).from_pretrained(path, **kwargs)
