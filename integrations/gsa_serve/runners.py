"""How the served model runs a forward over stored pasts: the one place that calls the model.

Why two runners behind one interface: a converted model decodes from per-layer
:class:`~gsa_plugins.adapters.past.LayerPast` objects through ``gsa_generate``'s recurrent cache (a GSA
state, a key window, or every key, as the adapter's decode plan says), and any other causal LM decodes
from transformers' own ``DynamicCache``. Both keep a session's past as one ``LayerPast`` per layer with
the batch first, so the engine batches sessions the same way for both (``LayerPast.stack`` left-pads
kept keys with invalid ones, ``select`` takes rows back); only the forward differs:

- :class:`RecurrentRunner`: a ``GSARecurrentCache`` holds the pasts; padded keys are marked by the
  pasts' ``valid`` flags, which windows and states ignore;
- :class:`KVRunner`: a ``DynamicCache`` holds every key and value; padded keys are masked by the
  ``attention_mask`` built from ``valid``.

Every row carries its own position ids, so sessions of different lengths share a forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gsa_core.errors import GSAError
from gsa_plugins.adapters.past import LayerPast


class UnservableModelError(GSAError):
    """A model the server cannot decode (no GSA decode plan, and a transformers cache it cannot batch)."""


@dataclass(frozen=True)
class SessionPast:
    """Everything one session's model has seen: one :class:`LayerPast` per layer (batch 1) and the token count.

    Immutable by contract (the recurrent contract is functional, transformers' caches concatenate into
    new tensors), so one past can be continued by several requests: the prefix cache relies on it.
    """

    layers: tuple[LayerPast, ...]
    length: int

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.layers)

    def detached(self) -> SessionPast:
        """A copy that owns its memory (a row selected from a batch is a view that pins the whole batch)."""
        return SessionPast(tuple(p.map(torch.clone) for p in self.layers), self.length)


class Runner(ABC):
    """A forward of the served model over a live cache built from stacked :class:`LayerPast` objects."""

    #: ``recurrent`` (GSA decode plans) or ``kv`` (transformers' DynamicCache)
    kind: str = ""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)

    @abstractmethod
    def open(self, layers: Sequence[LayerPast] | None, seen: int) -> Any:
        """A live cache holding ``layers`` (None: empty); ``seen`` is the longest row's token count."""

    @abstractmethod
    def layers(self, cache: Any) -> list[LayerPast]:
        """The pasts a live cache holds now (batch first, rows in order)."""

    @abstractmethod
    def forward(self, cache: Any, ids: Tensor, positions: Tensor) -> Tensor:
        """Feed ``ids [B, n]`` at ``positions [B, n]`` through the model, updating ``cache``; returns the last
        position's logits ``[B, vocab]`` in fp32."""

    def describe(self) -> str:
        return self.kind


class RecurrentRunner(Runner):
    """A converted model: per-layer pasts in ``gsa_generate``'s recurrent cache (states, windows, or all keys)."""

    kind = "recurrent"

    def __init__(self, model: Any, plans: list[Any]) -> None:
        super().__init__(model)
        self.plans = plans

    def open(self, layers: Sequence[LayerPast] | None, seen: int) -> Any:
        from gsa_generate import GSARecurrentCache

        cache = GSARecurrentCache(self.plans)
        for i, past in enumerate(layers or ()):
            cache.store_past(i, past, seen)
        return cache

    def layers(self, cache: Any) -> list[LayerPast]:
        return [cache.layer_past(i) for i in range(len(self.plans))]

    def forward(self, cache: Any, ids: Tensor, positions: Tensor) -> Tensor:
        out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def describe(self) -> str:
        return "recurrent (" + ", ".join(p.kind for p in self.plans) + ")"


@dataclass
class KVCache:
    """transformers' ``DynamicCache`` and which of its key positions are real (``valid [B, m]``)."""

    cache: Any
    valid: Tensor


class KVRunner(Runner):
    """Any other causal LM: transformers' ``DynamicCache`` (every key and value), rows left-padded and masked."""

    kind = "kv"

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        from transformers import DynamicCache

        probe = DynamicCache(config=model.config)
        layer_types = {type(layer).__name__ for layer in getattr(probe, "layers", [])}
        if layer_types - {"DynamicLayer"}:
            raise UnservableModelError(
                f"{type(model).__name__} keeps a transformers cache with {', '.join(sorted(layer_types))} layers, "
                "which the server cannot batch (only caches that keep every key can be left-padded); serve a model "
                "converted to GSA (gsa convert) or one whose cache keeps every key"
            )

    def open(self, layers: Sequence[LayerPast] | None, seen: int) -> KVCache:
        from transformers import DynamicCache

        if not layers:
            return KVCache(DynamicCache(config=self.model.config),
                           torch.zeros(1, 0, dtype=torch.bool, device=self.device))
        data = [(p.keys, p.values) for p in layers]
        valid = layers[0].valid
        assert valid is not None
        return KVCache(DynamicCache(ddp_cache_data=data, config=self.model.config), valid)

    def layers(self, cache: KVCache) -> list[LayerPast]:
        return [LayerPast(keys=layer.keys, values=layer.values, valid=cache.valid) for layer in cache.cache.layers]

    def forward(self, cache: KVCache, ids: Tensor, positions: Tensor) -> Tensor:
        valid = torch.cat((cache.valid, torch.ones_like(ids, dtype=torch.bool)), dim=1)
        out = self.model(input_ids=ids, attention_mask=valid.long(), position_ids=positions, cache=cache.cache,
                         use_cache=True, logits_to_keep=1)
        cache.valid = valid
        return out.logits[:, -1].float()


def runner_for(model: Any) -> Runner:
    """The recurrent runner for a model with GSA decode plans, else transformers' cache (if it can be batched)."""
    from gsa_generate.cache import decode_plans

    plans = decode_plans(model)
    if plans is not None:
        return RecurrentRunner(model, plans)
    return KVRunner(model)


__all__ = ["KVCache", "KVRunner", "RecurrentRunner", "Runner", "SessionPast", "UnservableModelError", "runner_for"]
