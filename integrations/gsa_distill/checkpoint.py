"""Checkpoints of a distillation run: trainable state, optimizer, controller, step and RNG, written atomically.

Why only the trainable state: the frozen weights come from the source model, so a checkpoint stays
small with LoRA (banks + adapters) and resuming rebuilds everything else exactly as the first run did.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gsa_core.bank import SplatBank

FILE = "last.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, plus every splat bank's tensors (``alive`` included)."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, SplatBank):
            for key, t in module.state_dict().items():
                state[f"{name}.{key}"] = t.detach().clone()
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` (names must exist; shapes must match)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = sorted(set(state) - set(own))
    if missing:
        raise KeyError(f"checkpoint entries not in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def save(folder: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus RNG states) to ``folder/last.pt`` via a temporary file and a rename."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    tmp = folder / (FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, folder / FILE)
    return folder / FILE


def load(folder: Path) -> dict[str, Any] | None:
    """The last checkpoint in ``folder`` (RNG states restored), or None when there is none."""
    path = folder / FILE
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    rng = payload.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return payload


__all__ = ["load", "load_trainable_state", "save", "trainable_state"]
