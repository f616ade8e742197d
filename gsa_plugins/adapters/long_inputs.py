"""The forward of a converted model on long inputs: positions checked first, then linear memory.

Every GSA model class's ``forward`` (``gsa_plugins.adapters.hf``) runs :func:`forward`, which

1. checks the positions the input needs against the learned position table, if the model has one
   (one :class:`~gsa_core.positions.PositionLimitError` naming the limit and the ``positions``
   strategies, instead of an ``IndexError`` from inside ``torch.embedding``);
2. for an input of at most ``long_context.prefill_chunk`` tokens (default 1024; 0: never), calls the
   original forward unchanged: with GSA switched off that is the original model, bit for bit;
3. for a longer one, takes the linear-memory path (docs/long-context.md):

   - a causal LM not being trained (no gradient, or eval mode) is *prefilled in chunks* through the
     recurrent cache (the caller's cache, else the default ``cache`` component that ``generate()``
     uses): one forward per piece of ``prefill_chunk`` tokens, each with a mask of its own keys only, so
     GSA layers keep a state, windowed layers their last keys, and no ``n x n`` mask or score exists.
     Logits are computed only where asked (``logits_to_keep``: ``generate()`` asks for the last one); a
     plain ``model(ids)`` returning every position's logits holds ``n x vocab`` of them, which is the
     caller's request. With ``labels`` the loss is summed over the pieces (the model's own loss
     function), equal to the one-pass mean;
   - otherwise (training, other heads) one forward with a *padding row* instead of the ``n x n`` mask
     (``[B, 1, 1, n]``, GPT-Neo's own mask contract: causality and windows are the attention module's),
     when the adapter's attention modules accept it (``HFAdapter.padding_row_masks``): GSA layers run
     through their backend with a causal mask spec (the ``kernel`` backend in linear memory), exact
     windowed layers compute only their window (:func:`banded_attention`). Exact global layers are
     quadratic in time whatever is done, and keep every key.

Torch only at import time.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gsa_core.config import LongContextConfig
from gsa_core.masks import MaskSpec
from gsa_core.numerics import blocked_softmax_attention
from gsa_core.registry import get_registry
from gsa_plugins.adapters.base import PositionTable, UnsupportedModelError, adapter_for
from gsa_plugins.adapters.layers import allowed_from_hf
from gsa_plugins.adapters.positions import check_input_positions, positions_needed

_SIGNATURES: dict[Callable[..., Any], inspect.Signature] = {}
_STATE = "_gsa_long_inputs"  # per model: its adapter and position table, found once
#: Query rows per block of :func:`banded_attention` (its scores are ``block x (block + window)``).
BANDED_BLOCK = 256


class LongContextWarning(UserWarning):
    """A long input through layers that keep every key (exact global attention): memory grows with it."""


# ----------------------------------------------------------------------------- settings
def prefill_chunk(model: nn.Module) -> int:
    """``long_context.prefill_chunk`` of a converted model's GSA config (the default when it has none)."""
    data = getattr(getattr(model, "config", None), "gsa", None)
    section = data.get("long_context") if isinstance(data, Mapping) else None
    if not isinstance(section, Mapping):
        return LongContextConfig.DEFAULT_CHUNK
    return int(section.get("prefill_chunk", LongContextConfig.DEFAULT_CHUNK))


def set_prefill_chunk(model: nn.Module, tokens: int) -> None:
    """Set a converted model's ``long_context.prefill_chunk`` (validated; saved with the model)."""
    from gsa_core.config import GSAConfig

    cfg = GSAConfig.from_model_config(model.config)
    data = cfg.to_dict()
    data["long_context"]["prefill_chunk"] = tokens
    model.config.gsa = GSAConfig.from_dict(data, source="prefill_chunk").to_dict()


def default_cache(model: nn.Module) -> Any | None:
    """A fresh default generation cache for ``model``: the first registered ``cache`` component (by name)
    that supports it, or None (what ``generate()`` uses when the caller gives none)."""
    registry = get_registry()
    for comp in registry.components("cache"):
        factory = registry.build("cache", comp.name)
        if factory.supports(model):
            return factory.create(model)
    return None


def _state(model: nn.Module) -> dict[str, Any]:
    state = model.__dict__.get(_STATE)
    if state is None:
        try:
            adapter = adapter_for(model)
        except UnsupportedModelError:
            adapter = None
        table = None if adapter is None else adapter.position_table(model)
        state = model.__dict__[_STATE] = {"adapter": adapter, "table": table}
    return state


def _position_table(model: nn.Module) -> PositionTable | None:
    """The model's position table, found once per model (and again when the module was replaced)."""
    state = _state(model)
    table = state["table"]
    if table is not None and model.get_submodule(table.name) is not table.module:
        state["table"] = table = state["adapter"].position_table(model)
    return table


# ----------------------------------------------------------------------------- padding rows
def padding_row(valid: Tensor | None, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``[B, 1, 1, length]`` additive mask of key padding (0: a real token, the dtype's minimum: padding),
    ``valid [B, length]`` (None: all real). GPT-Neo adds it to every query's scores; its attention module
    supplies causality and windows."""
    if valid is None:
        return torch.zeros(batch, 1, 1, length, dtype=dtype, device=device)
    row = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(~valid.to(device, torch.bool),
                                                                           torch.finfo(dtype).min)
    return row.view(batch, 1, 1, length)


def is_padding_row(mask: Tensor | None, n_q: int) -> bool:
    """Whether an attention module got a padding row (:func:`padding_row`) for ``n_q > 1`` queries. (For one
    query a row is also the ordinary mask, and means the same.)"""
    return mask is not None and mask.dim() == 4 and mask.shape[-2] == 1 and n_q > 1


def key_validity(mask: Tensor) -> Tensor | None:
    """``[B, n_k]`` bool of a padding row (True: a real key), or None when every key is real."""
    allowed = allowed_from_hf(mask)
    assert allowed is not None
    valid = allowed[:, 0, 0, :]
    return None if bool(valid.all()) else valid.contiguous()


# ----------------------------------------------------------------------------- exact attention in a band
def banded_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, *, window: int | None,
                     scaling: float = 1.0, block: int = BANDED_BLOCK) -> Tensor:
    """Exact causal softmax attention (queries are the last ``n_q`` of the ``n_k`` keys; a ``window``: only
    the last ``window`` keys) in query blocks, each against only the keys it can see.

    A windowed layer costs ``O(n * (block + window))`` in time and memory (autograd included) instead of
    ``O(n^2)``; a global one (``window`` None) is still quadratic in time, its memory per block bounded.
    fp32 scores and softmax (fp64 for fp64 inputs), probabilities in ``v``'s dtype (GPT-Neo's eager
    attention); ``valid [B, n_k]`` marks real keys (None: all); a query that sees no key gives zeros.
    ``q, k [B, H, ·, d]`` -> ``[B, H, n_q, d_v]``.
    """
    n_q, n_k = q.shape[-2], k.shape[-2]
    offset = n_k - n_q
    dtype = torch.promote_types(q.dtype, torch.float32)  # GPT-Neo's fp32 scores; fp64 stays fp64
    outs = []
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        hi = offset + stop
        lo = 0 if window is None else max(0, offset + start - window + 1)
        keys = k[..., lo:hi, :].to(dtype).transpose(-1, -2)
        queries = q[..., start:stop, :].to(dtype)
        spec = MaskSpec(causal=True, window=window, query_offset=offset + start - lo,
                        key_padding=None if valid is None else valid[:, lo:hi])
        allowed = spec.allowed(stop - start, hi - lo, device=q.device)

        def logits(rows: slice, queries: Tensor = queries, keys: Tensor = keys) -> Tensor:
            scores = torch.matmul(queries[..., rows, :], keys)
            return scores * scaling if scaling != 1.0 else scores

        outs.append(blocked_softmax_attention(logits, v[..., lo:hi, :], stop - start, block=stop - start,
                                              allowed=allowed))
    if not outs:
        return v.new_zeros(*q.shape[:-1], v.shape[-1])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


# ----------------------------------------------------------------------------- the forward
def call_arguments(forward: Callable[..., Any], model: nn.Module, args: tuple[Any, ...],
                   kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones bound to the forward's signature)."""
    if not args:
        return dict(kwargs)
    signature = _signature(forward)
    bound = signature.bind_partial(model, *args, **kwargs).arguments
    out: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.items()):
        kind = signature.parameters[name].kind
        if i == 0:
            continue  # self
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(model).__name__}.forward got extra positional arguments")
        else:
            out[name] = value
    return out


def _signature(forward: Callable[..., Any]) -> inspect.Signature:
    signature = _SIGNATURES.get(forward)
    if signature is None:
        signature = _SIGNATURES[forward] = inspect.signature(forward)
    return signature


def forward(model: nn.Module, original: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``original(model, ...)`` with the positions checked and, for long inputs, in linear memory (module doc)."""
    call = call_arguments(original, model, args, kwargs)
    tokens = call.get("input_ids")
    if tokens is None:
        tokens = call.get("inputs_embeds")
    if tokens is None or tokens.dim() < 2:
        return original(model, **call)
    n = int(tokens.shape[1])
    if "past_key_values" in call and call.get("cache") is None:
        call["cache"] = call.pop("past_key_values")
    cache = call.get("cache")
    past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    table = _position_table(model)
    if table is not None:
        check_input_positions(model, positions_needed(n, past, call.get("position_ids")), limit=table.rows)
    chunk = prefill_chunk(model)
    mask = call.get("attention_mask")
    if chunk <= 0 or n <= chunk or (mask is not None and mask.dim() != 2):
        return original(model, **call)
    causal_lm = "logits_to_keep" in _signature(original).parameters
    if causal_lm and not (model.training and torch.is_grad_enabled()):
        if cache is None:
            cache = default_cache(model)
        if cache is not None:
            return _chunked(model, original, call, cache, chunk, past)
    adapter = _state(model)["adapter"]
    if adapter is not None and adapter.padding_row_masks:
        batch = tokens.shape[0]
        valid = None if mask is None else mask.to(torch.bool)
        dtype = next(model.parameters()).dtype
        call["attention_mask"] = padding_row(valid, batch, past + n, dtype, tokens.device)
    return original(model, **call)


def _kept(logits_to_keep: Any, n: int, device: torch.device) -> Tensor:
    """The positions whose logits the caller asked for (``logits_to_keep``: 0 all, an int the last ones, or
    a 1-D tensor of positions)."""
    if isinstance(logits_to_keep, Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype == torch.bool:
            raise ValueError("a long input keeps logits by an int or a 1-D tensor of positions "
                             f"(got a {logits_to_keep.dim()}-D {logits_to_keep.dtype} tensor)")
        return logits_to_keep.to(device).remainder(n).sort().values
    keep = int(logits_to_keep or 0)
    return torch.arange(0 if keep == 0 else max(0, n - keep), n, device=device)


def _warn_growing(cache: Any) -> None:
    plans = getattr(cache, "plans", None)
    if not plans:
        return
    growing = [i for i, plan in enumerate(plans) if getattr(plan, "kind", None) == "full"]
    if growing:
        warnings.warn(
            f"a long input through layers {growing}, which keep every key (exact global attention, "
            "passthrough, or a non-recurrent backend): their memory grows with the context (cache.nbytes() shows "
            "it); GSA layers on a recurrent backend and windowed layers do not", LongContextWarning, stacklevel=4)


def _chunked(model: nn.Module, original: Callable[..., Any], call: dict[str, Any], cache: Any, chunk: int,
             past: int) -> Any:
    """Prefill ``call``'s tokens through ``cache`` in pieces of ``chunk`` tokens (module doc)."""
    key = "input_ids" if call.get("input_ids") is not None else "inputs_embeds"
    tokens: Tensor = call[key]
    batch, n = int(tokens.shape[0]), int(tokens.shape[1])
    device = tokens.device
    mask = call.get("attention_mask")
    valid = None if mask is None else mask.to(device, torch.bool)
    positions, types = call.get("position_ids"), call.get("token_type_ids")
    labels = call.pop("labels", None)
    return_cache = call.get("use_cache") is not False
    return_dict = call.get("return_dict")
    kept = _kept(call.get("logits_to_keep", 0), n, device)
    dtype = next(model.parameters()).dtype
    shifted = items = None
    if labels is not None:
        shifted = nn.functional.pad(labels.to(device), (0, 1), value=-100)[:, 1:]
        items = (shifted != -100).sum()
    _warn_growing(cache)
    logits, hidden, loss = [], [], None
    out = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        piece = dict(call, cache=cache, use_cache=True, return_dict=True)
        piece[key] = tokens[:, start:stop]
        piece["attention_mask"] = padding_row(None if valid is None else valid[:, : past + stop], batch,
                                              past + stop, dtype, device)
        if positions is not None:
            piece["position_ids"] = positions[..., start:stop]
        if types is not None:
            piece["token_type_ids"] = types[..., start:stop]
        here = kept[(kept >= start) & (kept < stop)] - start
        piece["logits_to_keep"] = 0 if labels is not None else here
        out = original(model, **piece)
        cache = out.cache
        piece_logits = out.logits
        if labels is not None:
            part = model.loss_function(logits=piece_logits, labels=None, vocab_size=model.config.vocab_size,
                                       shift_labels=shifted[:, start:stop].contiguous(), num_items_in_batch=items)
            loss = part if loss is None else loss + part
            piece_logits = piece_logits[:, here]
        logits.append(piece_logits)
        if out.hidden_states is not None:
            hidden.append(out.hidden_states)
    assert out is not None
    states = tuple(torch.cat(layer, dim=1) for layer in zip(*hidden, strict=True)) if hidden else None
    merged = {"loss": loss, "logits": logits[0] if len(logits) == 1 else torch.cat(logits, dim=1),
              "cache": cache if return_cache else None, "attentions": None, "hidden_states": states}
    result = type(out)(**merged)
    return result if return_dict is not False else result.to_tuple()


__all__ = [
    "BANDED_BLOCK", "LongContextWarning", "banded_attention", "call_arguments", "default_cache", "forward",
    "is_padding_row", "key_validity", "padding_row", "prefill_chunk", "set_prefill_chunk",
]
