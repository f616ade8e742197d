"""The constant-memory recurrent cache of a converted model, a ``transformers`` :class:`Cache`.

Why a cache of its own: a GSA layer's past is fully summarised by the kernel state ``(z, M)``
(``O(H·K·d)``, whatever the context), so keeping every key and value, as ``DynamicCache`` does,
wastes memory and makes each decoded token cost ``O(context)``. Per layer this cache keeps only
what that layer's attention needs:

- ``state``: a GSA layer (exact backend): the kernel state; no keys at all;
- ``window``: a sliding-window layer (exact softmax, or GSA inside the window): the last
  ``window - 1`` keys and values;
- ``hybrid``: exact over the last ``hybrid_window`` keys plus GSA for older ones: that window's keys
  and values, plus a kernel state into which keys are absorbed as they leave the window;
- ``full``: a global exact layer (mode ``exact`` or passthrough) or GSA through an inexact backend:
  every key (the only kind whose size grows; reported by :meth:`GSARecurrentCache.constant_size`).

The attention modules call :meth:`GSARecurrentCache.gsa_attend` instead of ``update`` (the gpt-neo
adapter's ``forward`` does so when it is handed this cache); any other cache takes the model's
ordinary path. Padding comes from the model's 4-D mask (its last row: which keys are real); the
mask is sized by :meth:`get_mask_sizes` to cover only the longest kept window plus the new tokens.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from gsa_core.calibration import gsa_input_scale
from gsa_core.masks import MaskSpec
from gsa_generate.attention import exact_attention, hybrid_with_state
from gsa_plugins.adapters.layers import GSALayer, allowed_from_hf
from gsa_plugins.backends.kernel import KernelBackend, KernelState

Kind = Literal["state", "window", "hybrid", "full"]
KINDS: tuple[str, ...] = ("state", "window", "hybrid", "full")
#: Tokens per piece when a long input (a prefill) goes through a window, hybrid or full layer:
#: bounds the score matrix to ``chunk x (window + chunk)``.
CHUNK = 256


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one attention layer is cached: its kind, window, GSA module (None: exact softmax) and logit scale."""

    kind: Kind
    window: int | None = None
    gsa: GSALayer | None = None
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown cache layer kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.kind in ("window", "hybrid") and (self.window is None or self.window < 1):
            raise ValueError(f"a {self.kind!r} cache layer needs a positive window, got {self.window!r}")
        if self.kind in ("state", "hybrid") and self.gsa is None:
            raise ValueError(f"a {self.kind!r} cache layer needs the layer's GSA module")

    @property
    def keep(self) -> int | None:
        """Past keys kept between calls (None: all of them)."""
        if self.kind == "state":
            return 0
        return None if self.kind == "full" else int(self.window) - 1  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- plans per model family
def _recurrent_backend(gsa: GSALayer) -> KernelBackend | None:
    """The kernel backend that continues this layer's GSA exactly, or None when its backend is inexact."""
    backend = gsa.backend
    if isinstance(backend, KernelBackend):
        return backend
    is_exact = getattr(backend, "is_exact", None)
    if callable(is_exact) and not is_exact(gsa.bank):
        return None  # e.g. sparse top-k: the kernel state would compute something else
    return KernelBackend()


def gpt_neo_plan(module: nn.Module) -> LayerPlan:
    """The plan of one (converted or original) ``GPTNeoSelfAttention``."""
    gsa = module._modules.get("gsa")
    local = module.attention_type == "local"
    window = int(module.config.window_size) if local else None
    if gsa is None or gsa.passthrough:
        return LayerPlan("window" if local else "full", window)
    if gsa.mode == "hybrid":
        return LayerPlan("hybrid", gsa.hybrid_window, gsa, gsa.scaling)
    if gsa.window is not None:
        return LayerPlan("window", gsa.window, gsa, gsa.scaling)
    if _recurrent_backend(gsa) is None:
        return LayerPlan("full", None, gsa, gsa.scaling)
    return LayerPlan("state", None, gsa, gsa.scaling)


def attention_modules(model: nn.Module) -> list[nn.Module] | None:
    """The attention modules the recurrent cache serves, in layer order; None for an unsupported model."""
    from gsa_plugins.adapters.gpt_neo import gsa_self_attention_class

    base = getattr(model, "base_model", model)
    blocks = getattr(base, "h", None)
    if blocks is None:
        return None
    modules = [getattr(getattr(block, "attn", None), "attention", None) for block in blocks]
    cls = gsa_self_attention_class()
    if not modules or not all(isinstance(m, cls) for m in modules):
        return None
    return modules


def supports_recurrent_cache(model: nn.Module) -> bool:
    """Whether :func:`recurrent_cache` serves ``model`` (a converted GPT-Neo, eager attention)."""
    return attention_modules(model) is not None


def recurrent_cache(model: nn.Module) -> GSARecurrentCache:
    """A fresh, empty recurrent cache for ``model``; pass it as ``cache=`` (or let ``generate`` make one)."""
    modules = attention_modules(model)
    if modules is None:
        raise TypeError(
            f"{type(model).__name__} has no recurrent GSA cache: supported are GPT-Neo models converted with the "
            "'gpt-neo' adapter (gsa_plugins.adapters.convert); other models use their ordinary DynamicCache"
        )
    cache = GSARecurrentCache([gpt_neo_plan(m) for m in modules])
    cache.signatures = [_signature(m) for m in modules]
    return cache


# ----------------------------------------------------------------------------- one layer
def _signature(module: nn.Module) -> tuple[int, bool, str] | None:
    """What the plan depends on and may change at run time (GSA on/off, mode)."""
    gsa = module._modules.get("gsa")
    return None if gsa is None else (id(gsa), bool(gsa.passthrough), str(gsa.mode))


class GSACacheLayer(CacheLayerMixin):
    """One layer's cached past (see the module docstring for the kinds)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, plan: LayerPlan) -> None:
        super().__init__()
        self.plan = plan
        self.is_sliding = plan.kind == "window"
        self.valid: Tensor | None = None  # [B, kept] True = real token
        self.state: KernelState | None = None
        self.seen = 0
        self._backend = _recurrent_backend(plan.gsa) if plan.gsa is not None else None
        self._scale = gsa_input_scale(plan.scaling) if plan.gsa is not None else 1.0

    def __repr__(self) -> str:
        return f"GSACacheLayer(kind={self.plan.kind!r}, window={self.plan.window}, seen={self.seen})"

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, _ = key_states.shape
        if self.plan.kind in ("window", "hybrid", "full"):
            self.keys = key_states.new_zeros(batch, heads, 0, key_states.shape[-1])
            self.values = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
            self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        if self.plan.kind in ("state", "hybrid"):
            assert self.plan.gsa is not None and self._backend is not None
            self.state = self._backend.init_state(self.plan.gsa.bank, batch, value_states.shape[-1], self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "a GSA recurrent cache layer is filled by the GSA attention path (GSARecurrentCache.gsa_attend), "
            "not by update(); this model's attention module does not support the recurrent cache"
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
        self.keys = self.values = self.valid = None
        self.state = None
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("the GSA recurrent cache cannot be cropped: its state has absorbed the tokens")

    def _map_batch(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        if self.keys is not None:
            self.keys, self.values, self.valid = fn(self.keys), fn(self.values), fn(self.valid)
        if self.state is not None:
            self.state = KernelState(fn(self.state.z), fn(self.state.M))

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

    # ------------------------------------------------------------------ sizes
    def tensors(self) -> Iterator[Tensor]:
        for t in (self.keys, self.values, self.valid):
            if t is not None:
                yield t
        if self.state is not None:
            yield self.state.z
            yield self.state.M

    def nbytes(self) -> int:
        """Bytes this layer holds (keys, values, padding flags, state)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------------------ attention
    def attend(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        """Attention of the new tokens ``q, k, v [B, H, n, ·]`` (``valid [B, n]``: real tokens) over the past
        and themselves; updates the cache. Returns ``[B, H, n, d_v]``."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        n = q.shape[-2]
        if self.plan.kind == "state":
            out = self._attend_state(q, k, v, valid)
        elif n <= CHUNK:
            out = self._attend_kept(q, k, v, valid)
        else:
            out = torch.cat([self._attend_kept(q[..., s:s + CHUNK, :], k[..., s:s + CHUNK, :],
                                               v[..., s:s + CHUNK, :], valid[:, s:s + CHUNK])
                             for s in range(0, n, CHUNK)], dim=-2)
        self.seen += n
        return out

    def _attend_state(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        gsa, backend, state = self.plan.gsa, self._backend, self.state
        assert gsa is not None and backend is not None and state is not None
        if self._scale != 1.0:
            q, k = q * self._scale, k * self._scale
        padding = None if bool(valid.all()) else valid
        if q.shape[-2] == 1:
            out, self.state = backend.step(q, k, v, gsa.bank, state, padding)
        else:
            out, self.state = backend._causal(q, k, v, gsa.bank, padding, state)
        return out.to(v.dtype)

    def _attend_kept(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        plan = self.plan
        assert self.keys is not None and self.values is not None and self.valid is not None
        keys, values = torch.cat((self.keys, k), dim=-2), torch.cat((self.values, v), dim=-2)
        all_valid = torch.cat((self.valid, valid), dim=-1)
        if plan.kind == "hybrid":
            assert plan.gsa is not None and self.state is not None and plan.window is not None
            out = hybrid_with_state(q, keys, values, all_valid, self.state, plan.gsa.bank, scaling=plan.scaling,
                                    scale=self._scale, window=plan.window)
        elif plan.gsa is not None:  # GSA over the kept keys (a window layer in gsa mode, or an inexact backend)
            padding = None if bool(all_valid.all()) else all_valid
            out = plan.gsa.attend(q, keys, values, MaskSpec(causal=True, key_padding=padding))
        else:
            out = exact_attention(q, keys, values, all_valid, scaling=plan.scaling, window=plan.window)
        keep = plan.keep
        if keep is not None and keys.shape[-2] > keep:
            drop = keys.shape[-2] - keep
            if plan.kind == "hybrid":  # keys leaving the exact window join the state
                assert plan.gsa is not None and self._backend is not None and self.state is not None
                old_k = keys[..., :drop, :] * self._scale if self._scale != 1.0 else keys[..., :drop, :]
                old_valid = all_valid[:, :drop]
                self.state = self._backend._absorb_keys(plan.gsa.bank, self.state, old_k, values[..., :drop, :],
                                                        None if bool(old_valid.all()) else old_valid)
            keys, values, all_valid = keys[..., drop:, :], values[..., drop:, :], all_valid[:, drop:]
        self.keys, self.values, self.valid = keys, values, all_valid
        return out


# ----------------------------------------------------------------------------- the cache
class GSARecurrentCache(Cache):
    """A ``transformers`` cache holding, per layer, a GSA kernel state and/or a key window (see module doc).

    ``generate()`` on a converted GPT-Neo creates one by default; build one explicitly with
    :func:`recurrent_cache`. ``nbytes()`` is what it holds; with no ``full`` layer it does not grow
    with the context (``constant_size``).
    """

    def __init__(self, plans: list[LayerPlan]) -> None:
        if not plans:
            raise ValueError("a GSARecurrentCache needs at least one layer plan")
        super().__init__(layers=[GSACacheLayer(p) for p in plans])
        self.signatures: list[tuple[int, bool, str] | None] | None = None  # set by recurrent_cache
        keeps = [p.keep for p in plans]
        self._mask_keep: int | None = None if any(k is None for k in keeps) else max(k or 0 for k in keeps)
        self._valid_ref: tuple[weakref.ref[Tensor] | None, Tensor | None] = (None, None)

    @property
    def plans(self) -> list[LayerPlan]:
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

    def _new_valid(self, mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
        """``[B, n]``: which of the new tokens are real, from the model's 4-D mask (its last row)."""
        if mask is None:
            return torch.ones(batch, n, dtype=torch.bool, device=device)
        # every layer of one forward gets the same mask tensor: read it once (by identity; no version counter,
        # which tensors made under torch.inference_mode() do not have)
        ref, cached = self._valid_ref
        if ref is not None and ref() is mask and cached is not None:
            return cached
        if mask.dim() != 4:
            raise ValueError(f"expected the model's 4-D attention mask, got shape {tuple(mask.shape)}")
        allowed = allowed_from_hf(mask)
        valid = allowed[:, 0, -1, -n:].expand(batch, n).contiguous()
        self._valid_ref = (weakref.ref(mask), valid)
        return valid

    def gsa_attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None) -> Tensor:
        """Attention of ``module`` (layer ``module.layer_id``) for the new ``query, key, value [B, H, n, d]``."""
        idx = int(module.layer_id)
        layer = self.layers[idx]
        if self.signatures is not None and _signature(module) != self.signatures[idx]:
            raise RuntimeError(
                f"layer {idx} changed since this cache was created (GSA switched on/off or its mode changed): "
                "start generation with a fresh cache (gsa_generate.recurrent_cache(model))"
            )
        batch, _, n, _ = query.shape
        valid = self._new_valid(attention_mask, batch, n, query.device)
        return layer.attend(query, key, value, valid)


__all__ = [
    "CHUNK", "KINDS", "GSACacheLayer", "GSARecurrentCache", "Kind", "LayerPlan", "attention_modules",
    "gpt_neo_plan", "recurrent_cache", "supports_recurrent_cache",
]
