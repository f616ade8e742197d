"""The default model ``gsa chat`` talks to: trained here on first use, then cached.

Why train instead of download: nothing may come from a model hub, and Python's own docstrings are on
every machine. The ``tiny`` layout trains in about three minutes on a 2-core CPU and then writes
English-like docstring prose. Its global layer is GSA trained from scratch (kernel backend, 64 splats per
head, the adaptation controller on; the local layer exact): at this size and budget it reached a lower
held-out perplexity than the same model with softmax attention (65 vs 106, ``gsa bench distill_causal``),
and it decodes with the constant-memory recurrent cache. The cache folder name carries a version, so
changing the recipe below (bump :data:`CHAT_MODEL_VERSION`) retrains instead of reusing a stale model.
Training happens in a temporary folder that is renamed into place at the end, so an interrupted run
never leaves a half cache; a cache damaged later (a truncated ``model.safetensors``, a file missing or
not valid JSON) is detected on use and trained again (:func:`cache_problem`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gsa_train.loop import DEFAULT_GSA

CHAT_MODEL_VERSION = 2
CHAT_MODEL_NAME = f"gsa-gpt-neo-tiny-stdlib-v{CHAT_MODEL_VERSION}"
#: The recipe (``gsa_train.loop.TrainSettings`` fields, without ``out``).
CHAT_SETTINGS: dict[str, Any] = {
    "corpus": "stdlib", "layout": "tiny", "attention": "gsa", "gsa": {**DEFAULT_GSA, "bank": {"n_splats": 64}},
    "steps": 900, "batch_size": 16, "block_len": 128, "lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.01,
    "log_every": 50, "seed": 0,
}


def chat_model_dir() -> Path:
    """Where the default chat model lives (it may not exist yet)."""
    from gsa_data.paths import cache_dir

    return cache_dir() / "models" / CHAT_MODEL_NAME


CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "train.json")


def cache_problem(path: Path | None = None) -> str | None:
    """What is wrong with the cached model in ``path`` (missing, truncated or corrupt files), or None."""
    from gsa_plugins.adapters.hf import safetensors_problem

    path = chat_model_dir() if path is None else path
    missing = [name for name in CACHE_FILES if not (path / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for name in CACHE_FILES:
        if name.endswith(".json"):
            try:
                json.loads((path / name).read_bytes())
            except (OSError, ValueError):
                return f"{name} is not valid JSON"
    problem = safetensors_problem(path / "model.safetensors")
    return None if problem is None else f"model.safetensors: {problem}"


def is_cached(path: Path | None = None) -> bool:
    return cache_problem(path) is None


def default_chat_model(progress: bool = True, **overrides: Any) -> Path:
    """The folder of the default chat model (``save_pretrained`` model + tokenizer), training it if missing.

    ``overrides`` change the recipe (tests use a few steps); they are not part of the cache name, so
    only pass them with a private ``GSA_HOME``.
    """
    from gsa_train.distributed import DataParallel
    from gsa_train.loop import TrainSettings, train

    final = chat_model_dir()
    problem = cache_problem(final)
    if problem is None:
        return final
    if final.exists():
        print(f"the cached default model {final} is damaged ({problem}); training it again", file=sys.stderr)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{CHAT_MODEL_NAME}.", dir=final.parent))
    try:
        settings = TrainSettings.build(**{**CHAT_SETTINGS, **overrides, "out": work, "progress": progress})
        import torch

        # One thread: the tiny model's matrices are too small to gain from more, and with a second
        # thread a busy 2-core machine trained about 5x slower (measured: 18 min against 3 min).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(settings, DataParallel())  # always one process, also when called under torchrun
        finally:
            torch.set_num_threads(threads)
        if final.exists() and not is_cached(final):  # a leftover from an older, broken layout of the cache
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(work, final)
        except OSError:  # another process finished first: keep its model
            if not is_cached(final):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


__all__ = ["CHAT_MODEL_NAME", "CHAT_MODEL_VERSION", "CHAT_SETTINGS", "chat_model_dir", "default_chat_model",
           "is_cached"]
