"""The constant-memory recurrent cache of a converted model: a ``transformers`` :class:`Cache` that only stores.

Why a cache of its own: a GSA layer's past is fully summarised by its backend's recurrent state
(``O(H·K·d)``, whatever the context), so keeping every key and value, as ``DynamicCache`` does,
wastes memory and makes each decoded token cost ``O(context)``. Per layer this cache keeps what that
layer's :class:`~gsa_plugins.adapters.past.DecodePlan` says (a state, a key window, both, or every
key; the plans come from the model's adapter, ``decode_plan``), as a
:class:`~gsa_plugins.adapters.past.LayerPast`. It never computes attention: the model's attention
modules recognise it as a :class:`~gsa_plugins.adapters.past.PastStore`, read their past, decode
(``GSALayer.decode``) and store the new past. The mask is sized by :meth:`get_mask_sizes` to cover
only the longest kept window plus the new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from gsa_plugins.adapters import adapter_for
from gsa_plugins.adapters.base import UnsupportedModelError
from gsa_plugins.adapters.past import DecodePlan, LayerPast, PastStore


def decode_plans(model: nn.Module) -> list[DecodePlan] | None:
    """The per-layer decode plans of ``model`` (its adapter's ``decode_plan``); None for an unsupported model."""
    try:
        return adapter_for(model).decode_plan(model)
    except UnsupportedModelError:
        return None


def supports_recurrent_cache(model: nn.Module) -> bool:
    """Whether :func:`recurrent_cache` serves ``model`` (its adapter has a decode plan for it)."""
    return decode_plans(model) is not None


def recurrent_cache(model: nn.Module) -> GSARecurrentCache:
    """A fresh, empty recurrent cache for ``model``; pass it as ``cache=`` (or let ``generate`` make one)."""
    try:
        plans = adapter_for(model).decode_plan(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{type(model).__name__} has no recurrent GSA cache: {exc}") from None
    return GSARecurrentCache(plans)


# ----------------------------------------------------------------------------- one layer
class GSACacheLayer(CacheLayerMixin):
    """One layer's stored past (:class:`LayerPast`) and how many tokens the layer has seen."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, plan: DecodePlan) -> None:
        super().__init__()
        self.plan = plan
        self.is_sliding = plan.kind == "window"
        self.past: LayerPast | None = None
        self.seen = 0

    def __repr__(self) -> str:
        return f"GSACacheLayer(kind={self.plan.kind!r}, window={self.plan.window}, seen={self.seen})"

    def store(self, past: LayerPast, new_tokens: int) -> None:
        self.past = past
        self.keys, self.values = past.keys, past.values  # what transformers' own code reads of a layer
        self.seen += new_tokens
        self.is_initialized = True

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device  # the past is made by the layer on its first call

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "a GSA recurrent cache only stores each layer's past: attention modules that support it decode through "
            "the PastStore contract (gsa_plugins.adapters.decoding.decode_with_store), not update(); this model's "
            "attention module does not support the recurrent cache"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        keep = self.plan.keep
        kept = self.seen if keep is None else min(self.seen, keep)
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.past = None
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("the GSA recurrent cache cannot be cropped: its state has absorbed the tokens")

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.past is not None:
            self.store(self.past.map(fn), 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self) -> None:  # nothing worth offloading: the state is small
        return

    def prefetch(self) -> None:
        return

    def nbytes(self) -> int:
        """Bytes this layer holds (keys, values, padding flags, state)."""
        return 0 if self.past is None else self.past.nbytes()


# ----------------------------------------------------------------------------- the cache
class GSARecurrentCache(Cache, PastStore):
    """A ``transformers`` cache storing, per layer, a GSA state and/or a key window (see the module doc).

    ``generate()`` on a converted GPT-Neo creates one by default; build one explicitly with
    :func:`recurrent_cache`. ``nbytes()`` is what it holds; with no ``full`` layer it does not grow
    with the context (``constant_size``).
    """

    def __init__(self, plans: list[DecodePlan]) -> None:
        if not plans:
            raise ValueError("a GSARecurrentCache needs at least one layer plan")
        super().__init__(layers=[GSACacheLayer(p) for p in plans])
        keeps = [p.keep for p in plans]
        self._mask_keep: int | None = None if any(k is None for k in keeps) else max(k or 0 for k in keeps)

    @property
    def plans(self) -> list[DecodePlan]:
        return [layer.plan for layer in self.layers]

    @property
    def constant_size(self) -> bool:
        """True when no layer keeps every key (the cache's size does not depend on the context)."""
        return self._mask_keep is not None

    def nbytes(self) -> int:
        """Bytes held by all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """One mask serves every layer: it covers the longest kept window (all keys if a layer keeps all)."""
        seen = self.get_seq_length()
        kept = seen if self._mask_keep is None else min(seen, self._mask_keep)
        return kept + query_length, seen - kept

    # ------------------------------------------------------------------ PastStore
    def decode_plan(self, layer_idx: int) -> DecodePlan:
        return self.layers[layer_idx].plan

    def layer_past(self, layer_idx: int) -> LayerPast | None:
        return self.layers[layer_idx].past

    def store_past(self, layer_idx: int, past: LayerPast, new_tokens: int) -> None:
        self.layers[layer_idx].store(past, new_tokens)


__all__ = [
    "GSACacheLayer", "GSARecurrentCache", "decode_plans", "recurrent_cache", "supports_recurrent_cache",
]
