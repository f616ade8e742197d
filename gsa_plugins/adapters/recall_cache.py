"""A GSA layer with a recall cache: its attention and its selections, one sequential process (docs/recall-and-evals.md).

Per row the layer's past is split four ways, disjoint (``gsa_core.recall`` states the semantics):

- the exact window (hybrid layers: key ``j`` is exact for query ``t`` when ``t - window < j <= t``);
- the keys awaiting a selection (left every future window since the last selection): their exact logit
  (``awaiting = "exact"``: with the window, LoLA's sliding window) or their GSA weight (``"gsa"``);
- the recall set: at most ``budget`` keys per head, by their exact logit;
- the state: everything else, through the backend's ``readout``.

Every ``block`` tokens (absolute positions) the awaiting keys and the recall set are scored by the policy;
the best ``budget`` stay, the others are absorbed. The full forward *is* this process run from an empty
past (:func:`recall_forward`), and decoding continues it (:func:`recall_extend`): a selection depends only
on the keys, values and state at that moment, never on how the tokens were split into calls, so
``prefill(n) + decode(m)`` equals ``forward(n + m)`` up to float rounding of the attention (the selections
and the state are bit-identical). Memory per row: the state, ``budget`` keys per head, and at most
``window - 1 + block`` kept keys, whatever the length. Torch only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gsa_core.bank import compute_dtype
from gsa_core.calibration import gsa_input_scale
from gsa_core.config import GSAConfig
from gsa_core.errors import ConfigError, MaskNotSupportedError
from gsa_core.masks import MaskSpec
from gsa_core.numerics import check_finite
from gsa_core.protocols import RecallPolicy, RecurrentBackend, is_exact_for
from gsa_core.recall import RecallSet, candidates, exact_readout, keep_best, merge_readouts
from gsa_plugins.adapters.past import CHUNK, LayerPast

if TYPE_CHECKING:
    from gsa_core.bank import SplatBank
    from gsa_plugins.adapters.layers import GSALayer


# ----------------------------------------------------------------------------- which layers take one
def recall_applies(*, causal: bool, mode: str, window: int | None) -> bool:
    """Whether a GSA layer can keep a recall cache: causal self-attention, in ``gsa`` mode without a sliding
    window of its own (which forgets by design) or in ``hybrid`` mode."""
    return causal and (mode == "hybrid" or (mode == "gsa" and window is None))


def recall_policy(config: GSAConfig, layer: int | None, *, causal: bool, mode: str, window: int | None,
                  backend: Any, bank: SplatBank) -> RecallPolicy | None:
    """The recall policy of one layer from ``config.recall`` (None: this layer keeps no cache).

    A layer named in ``recall.layers`` that cannot take one, or a backend that cannot continue a state
    exactly, is a :class:`ConfigError` naming the fix.
    """
    spec = config.recall
    if spec is None or (spec.layers is not None and layer not in spec.layers):
        return None
    if not recall_applies(causal=causal, mode=mode, window=window):
        if spec.layers is None:
            return None
        raise ConfigError(f"recall.layers names layer {layer}, which cannot keep a recall cache: it needs a causal "
                          "self-attention layer in 'gsa' mode without a sliding window, or in 'hybrid' mode")
    if not isinstance(backend, RecurrentBackend) or not is_exact_for(backend, bank):
        raise ConfigError(f"a recall cache needs a recurrent backend exact for the bank (kernel, auto); backend "
                          f"{config.backend.name!r} is not: set backend = 'kernel' or remove recall")
    return spec.build()


def recall_layer_problem(config: GSAConfig, layers: Sequence[tuple[int, str, bool, int | None]]) -> str | None:
    """What is wrong with ``config.recall.layers`` for a model whose attention modules are ``(index, mode, causal,
    window)`` (None: nothing): an index the model lacks, or a layer none of whose modules can keep a cache."""
    spec = config.recall
    if spec is None or spec.layers is None:
        return None
    fits: dict[int, bool] = {}
    for index, mode, causal, window in layers:
        fits[index] = fits.get(index, False) or recall_applies(causal=causal, mode=mode, window=window)
    missing = [i for i in spec.layers if i not in fits]
    if missing:
        return f"recall.layers names layer(s) {missing}, but the model's layers are {sorted(fits) or '(none)'}"
    unfit = [i for i in spec.layers if not fits[i]]
    if unfit:
        return (f"recall.layers names layer(s) {unfit}, which cannot keep a recall cache: it needs a causal "
                "self-attention layer in 'gsa' mode without a sliding window, or in 'hybrid' mode")
    return None


# ----------------------------------------------------------------------------- the process
def _empty_past(layer: GSALayer, backend: RecurrentBackend, q: Tensor, v: Tensor,
                policy: RecallPolicy) -> LayerPast:
    batch, heads, _, d = q.shape
    return LayerPast(
        state=backend.init_state(layer.bank, batch, v.shape[-1], q.device),
        keys=q.new_zeros(batch, heads, 0, d), values=v.new_zeros(batch, heads, 0, v.shape[-1]),
        valid=torch.zeros(batch, 0, dtype=torch.bool, device=q.device),
        recall=RecallSet.empty(batch, heads, policy.budget, d, v.shape[-1], device=q.device,
                               dtype=compute_dtype(q), value_dtype=v.dtype),
    )


def _select(layer: GSALayer, backend: RecurrentBackend, policy: RecallPolicy, past: LayerPast, *, window: int,
            scale: float, at: Tensor) -> LayerPast:
    """The selection of rows ``at [B]``: kept keys beyond the last ``window - 1`` are candidates with the cache."""
    assert past.keys is not None and past.values is not None and past.valid is not None and past.recall is not None
    m = past.keys.shape[-2]
    n_cand = max(0, m - max(window - 1, 0))
    seen = past.recall.seen
    positions = seen[:, None] - m + torch.arange(n_cand, device=seen.device)  # right-aligned columns
    keys = past.keys[..., :n_cand, :]
    cands = candidates(past.recall, keys * scale if scale != 1.0 else keys, past.values[..., :n_cand, :],
                       past.valid[:, :n_cand], positions)
    if policy.uses_readout:
        cands = dataclasses.replace(cands, readout=backend.readout(cands.keys, layer.bank, past.state))
    scores = policy.score(cands)
    if tuple(scores.shape) != tuple(cands.positions.shape):
        raise ValueError(f"recall policy {type(policy).__name__} returned scores {tuple(scores.shape)}, expected "
                         f"{tuple(cands.positions.shape)} [batch, heads, candidates]")
    valid = cands.valid[:, None, :].expand_as(scores)
    if not bool(torch.isfinite(scores.detach()[valid]).all()):
        raise ValueError(f"recall policy {type(policy).__name__} returned a non-finite score for a valid candidate")
    recall, (ek, ev, evalid) = keep_best(past.recall, cands, scores, at)
    state = backend.absorb(ek, ev, layer.bank, past.state, evalid)
    kept_valid = past.valid.clone()
    kept_valid[:, :n_cand] &= ~at[:, None]
    lead = int((kept_valid.any(0).cumsum(0) == 0).sum())  # leading columns no row needs any more
    return LayerPast(state=state, keys=past.keys[..., lead:, :], values=past.values[..., lead:, :],
                     valid=kept_valid[:, lead:], recall=recall)


def recall_extend(layer: GSALayer, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, past: LayerPast | None, *,
                  scaling: float, window: int) -> tuple[Tensor, LayerPast]:
    """Attention of new tokens ``q, k, v [B, H, n, ·]`` (``valid [B, n]``: real tokens) continuing ``past`` (None:
    an empty one) under the layer's recall cache; ``scaling``: the logit factor of ``q·k`` (GSA space is
    ``x·sqrt(scaling)``); ``window``: exact keys per query (0: none). Returns ``[B, H, n, d_v]`` and the new past."""
    from gsa_plugins.adapters.layers import _hybrid

    policy, backend = layer.recall, layer.recurrent_backend()
    assert policy is not None and backend is not None
    check_finite(q=q, k=k, v=v)
    if past is None or past.recall is None:
        past = _empty_past(layer, backend, q, v, policy)
    scale = gsa_input_scale(scaling)
    n, outs, start = q.shape[-2], [], 0
    while start < n:
        assert past.keys is not None and past.values is not None and past.valid is not None and past.recall is not None
        to_boundary = policy.block - past.recall.seen % policy.block  # >= 1 for every row
        step = min(int(to_boundary.min()), n - start, CHUNK)
        sl = slice(start, start + step)
        keys, values = torch.cat((past.keys, k[..., sl, :]), dim=-2), torch.cat((past.values, v[..., sl, :]), dim=-2)
        kept_valid = torch.cat((past.valid, valid[:, sl]), dim=-1)
        qs = q[..., sl, :]
        q_gsa = qs * scale if scale != 1.0 else qs
        summary = merge_readouts(backend.readout(q_gsa, layer.bank, past.state), exact_readout(q_gsa, past.recall))
        padding = None if bool(kept_valid.all()) else kept_valid
        exact_keys = keys.shape[-2] if policy.awaiting == "exact" else window  # every kept key, or the window
        outs.append(_hybrid(qs, keys, values, layer.bank, MaskSpec(causal=True, key_padding=padding), scaling=scaling,
                            window=exact_keys, summary=summary))
        seen = past.recall.seen + step
        past = LayerPast(state=past.state, keys=keys, values=values, valid=kept_valid,
                         recall=dataclasses.replace(past.recall, seen=seen))
        at = seen % policy.block == 0
        if bool(at.any()):
            past = _select(layer, backend, policy, past, window=window, scale=scale, at=at)
        start += step
    if not outs:
        return v.new_zeros(*q.shape[:-1], v.shape[-1]), past
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)), past


def recall_forward(layer: GSALayer, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, *, window: int) -> Tensor:
    """The full forward of a recall layer on GSA-space ``q, k`` (the plain dot product is the logit): the process
    of :func:`recall_extend` from an empty past, with the keys before the first query (a query offset, as with
    transformers' own cache) processed first. Causal masks with padding only."""
    batch, _, n_q, _ = q.shape
    n_k = k.shape[-2]
    off = mask.offset(n_q, n_k)
    if not mask.causal or mask.attend is not None or mask.window is not None or off < 0 or off + n_q > n_k:
        raise MaskNotSupportedError(
            "a layer with a recall cache serves causal attention with padding, queries aligned to the last keys "
            f"or to the first (this mask: {', '.join(sorted(mask.kinds(n_q, n_k))) or 'none'}, query offset {off})"
        )
    mask.check_shapes(batch, n_q, n_k)
    valid = mask.key_padding if mask.key_padding is not None else torch.ones(batch, n_k, dtype=torch.bool,
                                                                             device=k.device)
    past = None
    if off > 0:  # keys before the first query: the same process, outputs unused
        _, past = recall_extend(layer, k[..., :off, :], k[..., :off, :], v[..., :off, :], valid[:, :off], None,
                                scaling=1.0, window=window)
    sl = slice(off, off + n_q)
    out, _ = recall_extend(layer, q, k[..., sl, :], v[..., sl, :], valid[:, sl], past, scaling=1.0, window=window)
    if mask.query_padding is not None:
        out = out * mask.query_padding[:, None, :, None].to(out.dtype)
    return out


__all__ = ["recall_applies", "recall_extend", "recall_forward", "recall_layer_problem", "recall_policy"]
