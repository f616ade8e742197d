"""Checkpoints of a distillation run: trainable state, optimizer, controller, step and RNG, written atomically.

Why only the trainable state: the frozen weights come from the source model, so a checkpoint stays
small with LoRA (banks + adapters) and resuming rebuilds everything else exactly as the first run did.
Written and read through ``gsa_data.files`` (docs/safety.md): replaced atomically, private to the user,
loaded with ``weights_only=True``; a truncated, foreign or tampered file is one clear error.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from gsa_data.files import load_checkpoint, save_checkpoint
from torch import nn

from gsa_core.bank import SplatBank
from gsa_core.errors import CheckpointError

FILE = "last.pt"
#: What a distillation checkpoint must hold.
KEYS = ("stage", "step", "model", "optimizer", "controller", "history", "report", "timings", "rng")
FIX = "delete it (or the checkpoints folder) and run again without --resume"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, plus every splat bank's tensors (``alive`` included)."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, SplatBank):
            for key, t in module.state_dict().items():
                state[f"{name}.{key}"] = t.detach().clone()
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str = "checkpoint") -> None:
    """Copy ``state`` into ``model``: every name must exist with the same shape (else a :class:`CheckpointError`
    naming ``source``, before anything is copied)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds no model state: {FIX}")
    missing = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source} has entries this model lacks ({', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}): it is from another model or settings; {FIX}")
    wrong = [name for name, value in state.items()
             if not isinstance(value, torch.Tensor) or value.shape != own[name].shape]
    if wrong:
        name = wrong[0]
        got = tuple(state[name].shape) if isinstance(state[name], torch.Tensor) else type(state[name]).__name__
        raise CheckpointError(f"{source}: {name} has shape {got}, the model {tuple(own[name].shape)} "
                              f"(other --splats or settings than the run that wrote it); {FIX}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def save(folder: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus RNG states) to ``folder/last.pt``: atomically, 0600 in a 0700 folder."""
    payload = {**payload, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    return save_checkpoint(payload, folder / FILE)


def load(folder: Path, *, restore_rng: bool = True) -> dict[str, Any] | None:
    """The last checkpoint in ``folder`` (RNG states restored unless ``restore_rng=False``: then call
    :func:`restore_rng` when the run reaches that point), or None when there is none."""
    path = folder / FILE
    if not path.exists():
        return None
    payload = load_checkpoint(path, required=KEYS, what="distillation checkpoint", fix=FIX)
    if restore_rng:
        restore_rng_state(payload, path)
    return payload


def restore_rng_state(payload: dict[str, Any], path: Path | str = "checkpoint") -> None:
    """Put the global torch and Python generators back where the checkpoint left them."""
    try:
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_python_state(rng["python"]))
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise CheckpointError(f"distillation checkpoint {path} holds a damaged random-number state; {FIX}") from None


def _python_state(state: Any) -> tuple:
    """``random.getstate()`` as saved (lists may come back where tuples went in)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


__all__ = ["load", "load_trainable_state", "restore_rng_state", "save", "trainable_state"]
