"""The forward of a converted model on long inputs: positions checked first, then linear memory.

Every GSA model class's ``forward`` (``gsa_plugins.adapters.hf``) runs :func:`forward`, which

1. checks the positions the input needs against the learned position table, if the model has one
   (one :class:`~gsa_core.positions.PositionLimitError` naming the limit and the ``positions``
   strategies, instead of an ``IndexError`` from inside ``torch.embedding``);
2. hands the call to the original forward unchanged.

Torch only at import time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from gsa_plugins.adapters.base import PositionTable, UnsupportedModelError, adapter_for
from gsa_plugins.adapters.positions import check_input_positions, positions_needed

_SIGNATURES: dict[Callable[..., Any], inspect.Signature] = {}
_STATE = "_gsa_long_inputs"  # per model: its adapter and position table, found once


def call_arguments(forward: Callable[..., Any], model: nn.Module, args: tuple[Any, ...],
                   kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones bound to the forward's signature)."""
    if not args:
        return dict(kwargs)
    signature = _SIGNATURES.get(forward)
    if signature is None:
        signature = _SIGNATURES[forward] = inspect.signature(forward)
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


def _position_table(model: nn.Module) -> PositionTable | None:
    """The model's position table, found once per model (and again when the module was replaced)."""
    state = model.__dict__.get(_STATE)
    if state is None:
        try:
            adapter = adapter_for(model)
        except UnsupportedModelError:
            adapter = None
        state = model.__dict__[_STATE] = {"adapter": adapter, "table": None}
        state["table"] = None if adapter is None else adapter.position_table(model)
    table = state["table"]
    if table is not None and model.get_submodule(table.name) is not table.module:
        state["table"] = table = state["adapter"].position_table(model)
    return table


def forward(model: nn.Module, original: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``original(model, ...)`` after the input's positions were checked against the model's table."""
    call = call_arguments(original, model, args, kwargs)
    tokens = call.get("input_ids")
    if tokens is None:
        tokens = call.get("inputs_embeds")
    table = _position_table(model)
    if table is not None and tokens is not None and tokens.dim() >= 2:
        cache = call.get("cache", call.get("past_key_values"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        check_input_positions(model, positions_needed(tokens.shape[1], past, call.get("position_ids")),
                              limit=table.rows)
    return original(model, **call)


__all__ = ["call_arguments", "forward"]
