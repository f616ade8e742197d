"""Hugging Face glue: GSA model classes, ``from_pretrained``/``save_pretrained``, auto-class registration.

A converted model becomes an instance of a GSA subclass of its own class (``GPTNeoForCausalLM`` ->
``GSAGPTNeoForCausalLM``) with a GSA subclass of its config class whose ``model_type`` is
``gsa_<original>`` (``gsa_gpt_neo``). The subclass's ``__init__`` runs the original one and then
attaches the GSA layers described by ``config.gsa``, so ``from_pretrained`` rebuilds the exact
structure and loads every weight, splat banks included.

Loading a saved GSA checkpoint never prompts for or runs code from the checkpoint folder
(docs/safety.md): checkpoints carry no ``auto_map`` and no Python file, and every loader here passes
``trust_remote_code=False``.

- ``gsa_plugins.adapters.load_converted(path)``: one call, nothing else to import;
- ``AutoModel*.from_pretrained(path)`` after :func:`register_auto_classes` (or after any conversion
  or ``load_converted`` in the process). Without it transformers refuses the unknown ``gsa_*`` model
  type rather than silently loading the model without its GSA layers;
- :func:`load_tokenizer` for the tokenizer saved with a model (plain ``AutoTokenizer`` works too).

Loading errors (missing or truncated files, a corrupt ``config.json``, a wrong field type) become one
:class:`~gsa_core.errors.ModelLoadError` naming the folder (:func:`model_load_errors`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from gsa_core.config import GSAConfig
from gsa_core.errors import ConfigError, GSAError, ModelLoadError, bounded
from gsa_core.registry import get_registry
from gsa_plugins.adapters import long_inputs
from gsa_plugins.adapters.base import MODEL_TYPE_PREFIX, UnsupportedModelError
from gsa_plugins.adapters.interface import ensure_registered

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
    adapter, cfg = _adapter_of(config)
    with adapter.building(config):  # e.g. GPT-Neo: no n x n bias buffers, not even for a moment
        type(self)._gsa_original.__init__(self, config, *args, **kwargs)
    adapter.apply(self, cfg)


def _gsa_save_pretrained(self: PreTrainedModel, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` without an ``auto_map`` (one loaded from an older checkpoint is dropped): an
    ``auto_map`` makes transformers offer to run code from the folder (docs/safety.md)."""
    self.config.__dict__.pop("auto_map", None)
    return type(self)._gsa_original.save_pretrained(self, save_directory, *args, **kwargs)


def _gsa_prepare_cache_for_generation(self: PreTrainedModel, generation_config: Any, model_kwargs: dict,
                                      *args: Any, **kwargs: Any) -> Any:
    """``generate()`` without a cache of the caller's: the default generation cache a plugin registered
    (kind ``cache``, asked in name order; ``gsa_generate`` registers the recurrent GSA cache) for the first
    that supports the model; ``cache_implementation="dynamic"`` (or any other) keeps transformers' choice."""
    if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
            and generation_config.cache_implementation is None and not generation_config.is_assistant):
        cache = long_inputs.default_cache(self)
        if cache is not None:
            model_kwargs["cache"] = cache
            return None
    return type(self)._gsa_original._prepare_cache_for_generation(self, generation_config, model_kwargs,
                                                                   *args, **kwargs)


def _gsa_forward(original: type) -> Any:
    """The original class's ``forward`` behind :func:`gsa_plugins.adapters.long_inputs.forward` (positions
    checked against the learned table), with the original's signature (``generate()`` reads it)."""
    original_forward = original.forward

    @functools.wraps(original_forward)
    def forward(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        return long_inputs.forward(self, original_forward, args, kwargs)

    return forward


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
            "forward": _gsa_forward(original),
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


#: The name that the ``gsa_checkpoint.py`` stub of checkpoints written by versions before 0.2 imports.
checkpoint_classes = register_family


def __getattr__(name: str) -> type:
    """``GSA<Class>`` created on first access (so pickles and stubs can name GSA classes in a fresh process)."""
    original = getattr(transformers, name[len("GSA"):], None) if name.startswith("GSA") else None
    if isinstance(original, type) and issubclass(original, PreTrainedModel):
        return gsa_model_class(original)
    if isinstance(original, type) and getattr(original, "model_type", None):
        return gsa_config_class(original)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _adapter_of(model_config: Any) -> tuple[Any, GSAConfig]:
    """The adapter a converted model's config names, and its validated GSA config."""
    try:
        cfg = GSAConfig.from_model_config(model_config)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}. A checkpoint whose adapter comes from a plugin needs that plugin installed"
        ) from exc
    if cfg.adapter is None:
        raise ConfigError("this GSA model config names no adapter (config.gsa.adapter is null)")
    return get_registry().build("adapter", cfg.adapter.name, cfg.adapter.params), cfg


def apply_from_config(model: nn.Module) -> None:
    """Attach the GSA layers that ``model.config.gsa`` describes (what the GSA classes' ``__init__`` does)."""
    adapter, cfg = _adapter_of(model.config)
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
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def looks_local(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` means a folder here rather than a hub id (``name`` or ``org/name``)."""
    text = str(source)
    return (Path(text).expanduser().exists() or text.startswith((".", "/", "~", "\\")) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


def safetensors_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a ``.safetensors`` file's framing (empty, truncated, bad header), or None.

    Reads only the header: the byte count it promises must be the file's size, which catches every
    truncation and a zero-byte file before a loader fails with a cryptic message.
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "it is empty" if size == 0 else f"it is truncated ({size} bytes)"
            length = int.from_bytes(head, "little")
            if length > min(size - 8, 100 << 20):
                return f"its header is damaged or the file truncated ({size:,} bytes)"
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid (the file is damaged)"
    if not isinstance(header, dict):
        return "its header is not valid (the file is damaged)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "its header is not valid (the file is damaged)"
    if 8 + length + end != size:
        return f"it is truncated or damaged ({size:,} bytes where its header promises {8 + length + end:,})"
    return None


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a local model folder (checked: a folder, a JSON object, weights present and intact),
    or of a hub id via transformers; every problem is a :class:`ModelLoadError` naming the folder."""
    if not looks_local(path):
        from transformers import PretrainedConfig

        with model_load_errors(path):
            data, _ = PretrainedConfig.get_config_dict(str(path))
        return data
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist: give a folder saved with save_pretrained")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file: give the model's folder (saved with save_pretrained)")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder} is not a model folder (no config.json): give a folder saved with "
                             "save_pretrained")
    try:
        data = json.loads(config.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {config}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(bounded(f"{config} is not valid JSON ({exc}); restore or re-save the model")) from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type", ""), str):
        raise ModelLoadError(f"{config} is not a model config (a JSON object with a 'model_type' string)")
    check_weights(folder)
    return data


def check_weights(folder: str | os.PathLike[str]) -> None:
    """A local model folder has a weights file and its ``.safetensors`` files are whole."""
    base = Path(folder)
    present = [name for name in WEIGHT_FILES if (base / name).is_file()]
    if not present:
        raise ModelLoadError(f"{base} has no model weights (none of {', '.join(WEIGHT_FILES)}): was the save "
                             "interrupted? Save or convert the model again")
    files = [base / "model.safetensors"] if "model.safetensors" in present else []
    if not files and "model.safetensors.index.json" in present:
        try:
            index = json.loads((base / "model.safetensors.index.json").read_text(encoding="utf-8"))
            files = sorted({base / str(name) for name in index["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{base / 'model.safetensors.index.json'} is damaged: save the model again") from None
    for file in files:
        problem = safetensors_problem(file)
        if problem is not None:
            raise ModelLoadError(f"{file} cannot be loaded: {problem}. Save, convert or train the model again")


@contextlib.contextmanager
def model_load_errors(source: str | os.PathLike[str], what: str = "model") -> Iterator[None]:
    """Inside, any failure of transformers/safetensors to load ``source`` becomes one :class:`ModelLoadError`
    naming it (transformers raises OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError and
    safetensors' own errors for damaged input; the original stays chained for ``--debug``)."""
    try:
        yield
    except GSAError:
        raise
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(exc).__name__)
        local = looks_local(source)
        where = f"in {source}" if local else f"from the hub model {str(source)!r}"
        if isinstance(exc, ImportError):
            hint = "install what it names"
        elif local:
            hint = "check that the folder holds a complete model saved with save_pretrained"
        else:
            hint = ("it is not a local folder and could not be fetched: check the name and the network, or that "
                    "HF_HUB_OFFLINE is unset")
        raise ModelLoadError(bounded(f"could not load the {what} {where}: {first} ({hint})", 600)) from exc


def _register_for(data: dict[str, Any]) -> None:
    """Register the GSA classes a checkpoint config names (so transformers resolves them locally)."""
    for entry in (data, data.get("encoder"), data.get("decoder")):
        model_type = str(entry.get("model_type", "")) if isinstance(entry, dict) else ""
        if model_type.startswith(MODEL_TYPE_PREFIX) and model_type[len(MODEL_TYPE_PREFIX):] in CONFIG_MAPPING:
            register_family(model_type[len(MODEL_TYPE_PREFIX):])


def is_gsa_checkpoint(data: dict[str, Any]) -> bool:
    """Whether a ``config.json`` mapping (:func:`read_checkpoint_config`) is that of a converted model."""
    return data.get("gsa") is not None and (str(data.get("model_type", "")).startswith(MODEL_TYPE_PREFIX)
                                             or data.get("model_type") == "encoder-decoder")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in a model or tokenizer folder, without following any ``auto_map``.

    The GSA classes a checkpoint names are registered first, so transformers resolves its config
    locally and never asks whether to run the folder's code.
    """
    from transformers import AutoTokenizer

    source = str(path)
    if looks_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"tokenizer folder {folder} does not exist" if not folder.exists() else
                                 f"{folder} is a file: give the folder of a saved tokenizer")
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                          "vocab.json", "tokenizer.model", "spiece.model")):
            raise ModelLoadError(f"{folder} holds no tokenizer (no tokenizer.json or tokenizer_config.json): give a "
                                 "folder saved with tokenizer.save_pretrained")
        with contextlib.suppress(ModelLoadError, OSError, ValueError):
            config = folder / "config.json"
            if config.is_file():
                _register_for(json.loads(config.read_text(encoding="utf-8")))
    with model_load_errors(source, "tokenizer"):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def load_converted(path: str | Path, *, model_class: type | None = None, **kwargs: Any) -> PreTrainedModel:
    """Load a saved GSA checkpoint (``from_pretrained`` of its GSA class); ``kwargs`` go to ``from_pretrained``.

    ``model_class`` picks another head (e.g. ``transformers.GPTNeoModel``); by default the class the
    checkpoint was saved from. Never runs code from the folder (``trust_remote_code=False``).
    """
    data = read_checkpoint_config(path)
    kwargs["trust_remote_code"] = False
    if not is_gsa_checkpoint(data):
        raise ConfigError(
            f"{path} is not a GSA checkpoint (its config.json has no 'gsa' entry); convert the model first "
            f"(gsa convert SRC DST --config FILE, or gsa_plugins.adapters.convert)"
        )
    model_type = str(data.get("model_type", ""))
    base_type = model_type[len(MODEL_TYPE_PREFIX):]
    if model_type != "encoder-decoder" and base_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{path}: model type {model_type!r} is not a GSA form of a model type this transformers "
                             "knows")
    _register_for(data)
    with model_load_errors(path):
        if model_type == "encoder-decoder":
            from transformers import EncoderDecoderModel

            return EncoderDecoderModel.from_pretrained(path, **kwargs)
        if model_class is None:
            arch = (data.get("architectures") or [None])[0]
            name = arch[len("GSA"):] if isinstance(arch, str) and arch.startswith("GSA") else arch
            original = getattr(transformers, name, None) if isinstance(name, str) else None
            if not isinstance(original, type) or not issubclass(original, PreTrainedModel):
                from transformers import AutoModel

                return AutoModel.from_pretrained(path, **kwargs)
            model_class = original
        return gsa_model_class(model_class).from_pretrained(path, **kwargs)
