"""Which model ``gsa chat`` talks to: a saved folder, a hub name, or the embedded default.

Why one resolver: the chat, the scripted demo and the tests all load models the same way: a GSA
checkpoint through ``gsa_plugins.adapters.load_converted`` (so its splat attention is used), anything
else through ``AutoModelForCausalLM``; no MODEL means the reference GPT-Neo that ``gsa_train`` trains
on first use and caches (nothing downloaded).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsa_core.errors import GSAError


class ModelLoadError(GSAError):
    """MODEL is neither a loadable local folder nor a reachable hub model."""


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    name: str  # what the session records: a folder path or a hub name


def default_model_path(progress: bool = True) -> Path:
    """The embedded default: ``gsa_train.reference``'s cached model, trained on first use."""
    try:
        from gsa_train import reference
    except ImportError as exc:
        raise ModelLoadError("no MODEL given and the embedded default model is not available in this install "
                             f"({exc}); pass a folder with a saved causal LM and tokenizer") from None
    fn = getattr(reference, "default_chat_model", None)
    if fn is None:
        raise ModelLoadError("gsa_train.reference has no default_chat_model(); pass a MODEL folder instead")
    kwargs = {"progress": progress} if "progress" in inspect.signature(fn).parameters else {}
    return Path(fn(**kwargs))


def _is_gsa_checkpoint(folder: Path) -> bool:
    import json

    config = folder / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text(encoding="utf-8"))
    return data.get("gsa") is not None


def load_chat_model(model: str | os.PathLike[str] | None = None, *, progress: bool = True) -> ChatModel:
    """Load MODEL (a folder or hub name), or the embedded default when ``None``; errors say what to do."""
    if model is None:
        folder = default_model_path(progress=progress)
        loaded = load_chat_model(folder, progress=progress)
        return ChatModel(loaded.model, loaded.tokenizer, str(folder))
    text = str(model)
    folder = Path(text).expanduser()
    looks_local = folder.exists() or text.startswith((".", "/", "~"))  # hub names look like "org/name"
    if looks_local and not folder.is_dir():
        raise ModelLoadError(f"model folder {text!r} does not exist; give a folder saved with save_pretrained "
                             "(model and tokenizer), a hub model name, or no MODEL for the embedded default")
    source = str(folder) if folder.is_dir() else text
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the "Loading weights" bar would interleave with the chat
        tokenizer = AutoTokenizer.from_pretrained(source)
        if folder.is_dir() and _is_gsa_checkpoint(folder):
            from gsa_plugins.adapters import load_converted

            lm = load_converted(folder)
        else:
            lm = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as exc:
        where = f"the folder {source}" if folder.is_dir() else f"the hub model {source!r}"
        offline = "" if folder.is_dir() else (" (it is not a local folder, and it could not be fetched: check the name "
                                              "and the network, or that HF_HUB_OFFLINE is unset)")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load {where} as a causal language model with a tokenizer{offline}: {first}"
                             ) from None
    lm.eval()
    return ChatModel(lm, tokenizer, source)


__all__ = ["ChatModel", "ModelLoadError", "default_model_path", "load_chat_model"]
