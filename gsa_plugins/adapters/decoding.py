"""Decoding with a stored past: the layer computes, the generation cache only stores (DESIGN.md section 2).

Between two forward calls of a causal model, what one attention layer needs of the past is a
``LayerPast``, kept by a ``PastStore`` (both in :mod:`gsa_plugins.adapters.past`; ``gsa_generate``'s
recurrent cache is a store, a ``transformers`` ``Cache``). How a layer decodes is its ``DecodePlan``,
which the model's adapter gives per layer (``HFAdapter.decode_plan``):

- ``state``: a GSA layer on a recurrent backend: the backend's state, no keys
  (``GSALayer.decode`` -> ``backend.extend``);
- ``window``: a sliding-window layer (exact softmax, or GSA inside the window): the last
  ``window - 1`` keys and values;
- ``hybrid``: exact over the last ``hybrid_window`` keys plus GSA for older ones: that window's keys
  and values plus a state; keys leaving the window are absorbed into the state, whose ``readout``
  joins the window's softmax under one normaliser;
- ``full``: a global exact layer (passthrough included), or GSA through a non-recurrent backend (or
  a hybrid layer whose backend is not exact): every key (the only kind that grows).
- ``recall``: a GSA or hybrid layer with a recall cache (``gsa_plugins.adapters.recall_cache``): a
  state, a fixed budget of exact keys per head chosen by a policy, the keys awaiting the next selection
  and (hybrid) the window.

A host attention module handed a ``PastStore`` calls :func:`decode_with_store` with its new
queries, keys and values; the call descends store (read) -> layer -> backend -> bank, then writes
the new past back. Windows count key positions (padding included), exactly as the full forward does.
Torch only.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gsa_core.numerics import blocked_softmax_attention, rows_per_block
from gsa_plugins.adapters.layers import allowed_from_hf
from gsa_plugins.adapters.past import DecodePlan, LayerPast, PastStore, attend_kept, layer_signature

if TYPE_CHECKING:
    from gsa_plugins.adapters.layers import GSALayer

#: Elements of one block of exact scores (``rows x keys x batch x heads``).
_SCORE_BLOCK = 1 << 22


# ----------------------------------------------------------------------------- masks of the new tokens
class _LastMask:
    """Which new tokens are real, read once per forward: every layer gets the same mask tensor
    (remembered by identity; tensors made under ``torch.inference_mode()`` have no version counter)."""

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref[Tensor], int, Tensor] | None = None

    def valid(self, mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
        if mask is None:
            return torch.ones(batch, n, dtype=torch.bool, device=device)
        entry = self._entry
        if entry is not None and entry[0]() is mask and entry[1] == n:
            return entry[2]
        if mask.dim() != 4:
            raise ValueError(f"expected the model's 4-D attention mask, got shape {tuple(mask.shape)}")
        allowed = allowed_from_hf(mask)
        assert allowed is not None
        valid = allowed[:, 0, -1, -n:].expand(batch, n).contiguous()  # the last query sees every real key
        self._entry = (weakref.ref(mask), n, valid)
        return valid


_LAST_MASK = _LastMask()


def new_token_validity(mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """``[B, n]``: which of the ``n`` new tokens are real, from the model's 4-D mask (its last row)."""
    return _LAST_MASK.valid(mask, batch, n, device)


# ----------------------------------------------------------------------------- exact attention
def visible(n_q: int, valid: Tensor, window: int | None) -> Tensor:
    """``[B, n_q, m]`` bool: causal (queries are the last ``n_q`` keys), within ``window``, real key."""
    m = valid.shape[-1]
    q_pos = torch.arange(m - n_q, m, device=valid.device).unsqueeze(1)
    k_pos = torch.arange(m, device=valid.device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    return allowed.unsqueeze(0) & valid[:, None, :]


def exact_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, scaling: float,
                    window: int | None) -> Tensor:
    """Softmax attention in fp32 (as GPT-Neo computes it): ``q [B, H, n, d]``, ``k, v [B, H, m, ·]``,
    ``valid [B, m]`` -> ``[B, H, n, d_v]`` in ``v``'s dtype; a query that sees no key returns zeros."""
    batch, heads, n, _ = q.shape
    kt = k.float().transpose(-1, -2)

    def logits(rows: slice) -> Tensor:
        scores = torch.matmul(q[..., rows, :].float(), kt)
        return scores * scaling if scaling != 1.0 else scores

    block = rows_per_block(n, k.shape[-2] * batch * heads, _SCORE_BLOCK)
    return blocked_softmax_attention(logits, v, n, block=block, allowed=visible(n, valid, window).unsqueeze(1))


def exact_decode(plan: DecodePlan, q: Tensor, k: Tensor, v: Tensor, valid: Tensor,
                 past: LayerPast | None) -> tuple[Tensor, LayerPast]:
    """Decode a layer that computes exact softmax (``window`` or ``full`` plan)."""

    def attend(q: Tensor, keys: Tensor, values: Tensor, kept_valid: Tensor, state: Any) -> Tensor:
        return exact_attention(q, keys, values, kept_valid, scaling=plan.scaling, window=plan.window)

    return attend_kept(past, q, k, v, valid, keep=plan.keep, attend=attend)


# ----------------------------------------------------------------------------- the entry point
def decode_with_store(store: PastStore, layer_idx: int, gsa: GSALayer | None, q: Tensor, k: Tensor, v: Tensor,
                      attention_mask: Tensor | None) -> Tensor:
    """Attention of layer ``layer_idx`` for its new ``q, k, v [B, H, n, d]`` over its stored past; stores
    the new past. ``gsa``: the layer's GSA module now (checked against the store's plan)."""
    plan = store.decode_plan(layer_idx)
    if layer_signature(gsa) != plan.signature:
        raise RuntimeError(
            f"layer {layer_idx} changed since this cache was created (GSA switched on/off, its mode or its recall "
            "cache changed): start generation with a fresh cache (gsa_generate.recurrent_cache(model))"
        )
    batch, _, n, _ = q.shape
    valid = new_token_validity(attention_mask, batch, n, q.device)
    past = store.layer_past(layer_idx)
    if plan.gsa is not None:
        out, past = plan.gsa.decode(plan, q, k, v, valid, past)
    else:
        out, past = exact_decode(plan, q, k, v, valid, past)
    store.store_past(layer_idx, past, n)
    return out


__all__ = ["decode_with_store", "exact_attention", "exact_decode", "new_token_validity", "visible"]
