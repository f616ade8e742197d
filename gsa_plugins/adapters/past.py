"""What a generation cache keeps per attention layer, and how a layer decodes (its plan).

The data half of decoding (:mod:`gsa_plugins.adapters.decoding` computes): a :class:`DecodePlan` per
layer (the adapter's ``decode_plan``), the :class:`LayerPast` a store keeps for it, the
:class:`PastStore` contract a host attention module recognises, and :func:`attend_kept`, the one
mechanism for "attend over kept keys plus the new ones, then keep the last few". Torch only.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gsa_core.recall import RecallSet

if TYPE_CHECKING:
    from gsa_plugins.adapters.layers import GSALayer

Kind = Literal["state", "window", "hybrid", "full", "recall"]
KINDS: tuple[str, ...] = ("state", "window", "hybrid", "full", "recall")
#: Tokens per piece when many new tokens (a prefill) go through a window, hybrid or full layer:
#: bounds the score matrix to ``CHUNK x (kept + CHUNK)``.
CHUNK = 256
Signature = tuple[int, bool, str, bool] | None


def layer_signature(gsa: GSALayer | None) -> Signature:
    """What a plan depends on and may change at run time: which GSA layer, GSA on/off, its mode, whether it
    keeps a recall cache."""
    return None if gsa is None else (id(gsa), bool(gsa.passthrough), str(gsa.mode), gsa.recall is not None)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How one attention layer decodes: its kind, window, GSA layer (None: exact softmax) and logit scale.

    ``recall``: a GSA layer with a recall cache (``gsa_plugins.adapters.recall_cache``): a state, the exact
    keys its policy keeps, and the keys not yet chosen; ``window`` is its exact window (hybrid) or None.

    ``signature`` is :func:`layer_signature` of the layer when the plan was made: a store built for a
    plan refuses a layer that changed since (GSA switched on or off, mode changed).
    """

    kind: Kind
    window: int | None = None
    gsa: GSALayer | None = None
    scaling: float = 1.0
    signature: Signature = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown decode plan kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.kind in ("window", "hybrid") and (self.window is None or self.window < 1):
            raise ValueError(f"a {self.kind!r} layer needs a positive window, got {self.window!r}")
        if self.kind in ("state", "hybrid", "recall") and self.gsa is None:
            raise ValueError(f"a {self.kind!r} layer needs the layer's GSA module")

    @property
    def keep(self) -> int | None:
        """Past keys kept between calls for the window (None: all of them; a recall layer also keeps at most
        its ``block`` keys awaiting a selection, and its fixed-size cache)."""
        if self.kind == "state" or (self.kind == "recall" and self.window is None):
            return 0
        return None if self.kind == "full" else int(self.window) - 1  # type: ignore[arg-type]


def exact_plan(window: int | None, gsa: GSALayer | None = None, scaling: float = 1.0) -> DecodePlan:
    """The plan of a layer computing exact softmax (no GSA layer, or one in passthrough)."""
    return DecodePlan("window" if window is not None else "full", window, None, scaling, layer_signature(gsa))


# ----------------------------------------------------------------------------- what a store keeps
@dataclasses.dataclass
class LayerPast:
    """One layer's stored past: a recurrent ``state`` and/or the kept ``keys``, ``values`` ``[B, H, m, ·]``
    (host space) with ``valid [B, m]`` (True: a real token), and a recall layer's exact cache ``recall``
    (a :class:`gsa_core.recall.RecallSet`). Every tensor has the batch first, so pasts
    of several sequences stack (:meth:`stack`; kept windows of different lengths are left-padded with
    invalid keys, which windows and states ignore) and split again (:meth:`select`)."""

    state: Any = None
    keys: Tensor | None = None
    values: Tensor | None = None
    valid: Tensor | None = None
    recall: RecallSet | None = None

    def tensors(self) -> list[Tensor]:
        kept = [t for t in (self.keys, self.values, self.valid) if t is not None]
        for part in (self.state, self.recall):
            kept += [] if part is None else list(part.tensors().values())
        return kept

    def nbytes(self) -> int:
        """Bytes held (kept keys, values, padding flags and the state)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn: Callable[[Tensor], Tensor]) -> LayerPast:
        """``fn`` applied to every tensor (reorder beams, repeat or select batch rows, move devices)."""
        return LayerPast(
            state=None if self.state is None else self.state.map(fn),
            keys=None if self.keys is None else fn(self.keys),
            values=None if self.values is None else fn(self.values),
            valid=None if self.valid is None else fn(self.valid),
            recall=None if self.recall is None else self.recall.map(fn),
        )

    def select(self, index: int | slice | Tensor) -> LayerPast:
        """Rows ``index`` of the batch (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda t: t[index])

    @staticmethod
    def stack(pasts: Sequence[LayerPast]) -> LayerPast:
        """The pasts of several sequences as one batch (continuous batching of decode steps)."""
        if not pasts:
            raise ValueError("stack needs at least one past")
        state = recall = None
        if pasts[0].state is not None:
            state = type(pasts[0].state).stack([p.state for p in pasts])
        if pasts[0].recall is not None:
            recall = RecallSet.stack([p.recall for p in pasts])  # type: ignore[misc]
        if pasts[0].keys is None:
            return LayerPast(state=state, recall=recall)
        m = max(p.keys.shape[-2] for p in pasts)  # type: ignore[union-attr]

        def left_pad(t: Tensor, value: float | bool) -> Tensor:
            extra = m - t.shape[-2 if t.dim() == 4 else -1]
            if extra == 0:
                return t
            return F.pad(t, (0, 0, extra, 0) if t.dim() == 4 else (extra, 0), value=value)

        return LayerPast(
            state=state,
            keys=torch.cat([left_pad(p.keys, 0.0) for p in pasts]),  # type: ignore[arg-type]
            values=torch.cat([left_pad(p.values, 0.0) for p in pasts]),  # type: ignore[arg-type]
            valid=torch.cat([left_pad(p.valid, False) for p in pasts]),  # type: ignore[arg-type]
            recall=recall,
        )


class PastStore(ABC):
    """The typed contract of a generation cache that *stores* each layer's :class:`LayerPast`.

    A host attention module recognises it (``isinstance``) and decodes with :func:`decode_with_store`
    instead of calling ``update``; the store never computes attention.
    """

    @abstractmethod
    def decode_plan(self, layer_idx: int) -> DecodePlan:
        """The plan the store was built for at layer ``layer_idx``."""

    @abstractmethod
    def layer_past(self, layer_idx: int) -> LayerPast | None:
        """The stored past of layer ``layer_idx`` (None before its first call)."""

    @abstractmethod
    def store_past(self, layer_idx: int, past: LayerPast, new_tokens: int) -> None:
        """Keep ``past`` for layer ``layer_idx``, which has now seen ``new_tokens`` more tokens."""


def attend_kept(past: LayerPast | None, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, keep: int | None,
                attend: Callable[[Tensor, Tensor, Tensor, Tensor, Any], Tensor],
                absorb: Callable[[Tensor, Tensor, Tensor, Any], Any] | None = None,
                state: Any = None) -> tuple[Tensor, LayerPast]:
    """Attention of new tokens over kept keys plus themselves, in pieces of :data:`CHUNK` new tokens.

    ``attend(q, keys, values, valid, state)`` computes one piece over every kept and new key; then the
    keys beyond ``keep`` are dropped, through ``absorb(keys, values, valid, state) -> state`` when given
    (a hybrid layer's keys leaving its window join its state).
    """
    if past is not None and past.keys is not None:
        keys, values, kept_valid = past.keys, past.values, past.valid
        assert values is not None and kept_valid is not None
    else:
        keys, values = k[..., :0, :], v[..., :0, :]
        kept_valid = valid[:, :0]
    outs = []
    for start in range(0, max(1, q.shape[-2]), CHUNK):
        sl = slice(start, start + CHUNK)
        keys, values = torch.cat((keys, k[..., sl, :]), dim=-2), torch.cat((values, v[..., sl, :]), dim=-2)
        kept_valid = torch.cat((kept_valid, valid[:, sl]), dim=-1)
        outs.append(attend(q[..., sl, :], keys, values, kept_valid, state))
        if keep is not None and keys.shape[-2] > keep:
            drop = keys.shape[-2] - keep
            if absorb is not None:
                state = absorb(keys[..., :drop, :], values[..., :drop, :], kept_valid[:, :drop], state)
            keys, values, kept_valid = keys[..., drop:, :], values[..., drop:, :], kept_valid[:, drop:]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out, LayerPast(state=state, keys=keys, values=values, valid=kept_valid)




__all__ = [
    "CHUNK", "KINDS", "DecodePlan", "Kind", "LayerPast", "PastStore", "Signature", "attend_kept", "exact_plan",
    "layer_signature",
]
