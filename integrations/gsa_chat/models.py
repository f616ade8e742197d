"""Which model ``gsa chat`` talks to: a saved folder, a hub name, or the embedded default.

Why one resolver: the chat, the scripted demo and the tests all load models the same way: a GSA
checkpoint through ``gsa_plugins.adapters.load_converted`` (so its splat attention is used), anything
else through ``AutoModelForCausalLM``; no MODEL means the reference GPT-Neo that ``gsa_train`` trains
on first use and caches (nothing downloaded). Nothing is ever run from a model folder: the tokenizer and
the model load with ``trust_remote_code=False`` (``gsa_plugins.adapters.hf``), so no prompt can eat the
first line of piped input.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsa_core.errors import ModelLoadError


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


def load_chat_model(model: str | os.PathLike[str] | None = None, *, progress: bool = True) -> ChatModel:
    """Load MODEL (a folder or hub name), or the embedded default when ``None``; errors say what to do."""
    if model is None:
        folder = default_model_path(progress=progress)
        loaded = load_chat_model(folder, progress=progress)
        return ChatModel(loaded.model, loaded.tokenizer, str(folder))
    from transformers.utils import logging as hf_logging

    from gsa_plugins.adapters.hf import (
        is_gsa_checkpoint,
        load_converted,
        load_tokenizer,
        looks_local,
        model_load_errors,
        read_checkpoint_config,
    )

    text = str(model)
    hf_logging.disable_progress_bar()  # the "Loading weights" bar would interleave with the chat
    if looks_local(text):
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {text!r} does not exist; give a folder saved with save_pretrained "
                                 "(model and tokenizer), a hub model name, or no MODEL for the embedded default")
        source = str(folder)
    else:
        source = text
    config = read_checkpoint_config(source)  # checked: a model folder with intact weights
    tokenizer = load_tokenizer(source)
    if is_gsa_checkpoint(config):
        lm = load_converted(source)
    else:
        from transformers import AutoModelForCausalLM

        with model_load_errors(source, "causal language model"):
            lm = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False)
    lm.eval()
    return ChatModel(lm, tokenizer, source)


__all__ = ["ChatModel", "ModelLoadError", "default_model_path", "load_chat_model"]
