"""A model's learned absolute positions: extend the table by a named strategy, and check inputs against it.

The strategy (kind ``positions``: ``interpolate``, ``tile``, ``none`` or a plugin's) transforms the
table's rows and knows no model family; the model's adapter says where the table is
(:meth:`~gsa_plugins.adapters.base.HFAdapter.position_table`) and resizes what else depends on the count
(:meth:`~gsa_plugins.adapters.base.HFAdapter.positions_resized`). A converted model records the
extension in its GSA config (``long_context.positions``, ``long_context.trained_positions``), so
``save_pretrained`` / ``from_pretrained`` rebuild the same model: the config's
``max_position_embeddings`` sizes the table and the checkpoint holds the extended rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gsa_core.config import GSAConfig
from gsa_core.errors import ConfigError
from gsa_core.positions import PositionLimitError, check_positions, keeps_trained_rows
from gsa_core.registry import get_registry
from gsa_plugins.adapters.base import PositionTable, UnsupportedModelError, adapter_for, describe_model, is_converted


def position_table(model: nn.Module) -> PositionTable | None:
    """The model's learned position table (its adapter's answer), or None when it has none."""
    try:
        return adapter_for(model).position_table(model)
    except UnsupportedModelError:
        return None


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model's learned table holds (None: no learned table, no limit)."""
    table = position_table(model)
    return None if table is None else table.rows


def extension_note(model: nn.Module) -> str | None:
    """``"interpolate from 64"`` when a converted model's table was extended, else None (for messages)."""
    trained = trained_positions(model)
    if trained is None:
        return None
    name = (model.config.gsa["long_context"].get("positions") or {}).get("name", "?")
    return f"{name} from {trained}"


def check_input_positions(model: nn.Module, needed: int, *, limit: int | None = None, what: str = "the input") -> None:
    """Raise :class:`~gsa_core.positions.PositionLimitError` when an input needs ``needed`` positions and the
    model's learned table (``limit``, default: asked from the adapter) has fewer."""
    limit = position_limit(model) if limit is None else limit
    if limit is not None and needed > limit:
        check_positions(needed, limit, extended=extension_note(model), what=what)


def positions_needed(length: int, past: int = 0, position_ids: Tensor | None = None) -> int:
    """Positions an input of ``length`` tokens after ``past`` cached ones needs (its largest position + 1)."""
    if position_ids is not None and position_ids.numel():
        return int(position_ids.max()) + 1
    return past + length


def extend_positions(model: nn.Module, max_positions: int, strategy: str = "interpolate",
                     params: Mapping[str, Any] | None = None) -> nn.Module:
    """Give ``model`` a learned position table of ``max_positions`` rows made by ``strategy`` (in place).

    Works on original and converted models of any family whose adapter names a position table; a
    converted model records the strategy in its GSA config. ``max_positions`` below the current rows is
    an error (shrinking is not an extension); equal rows change nothing but the record.
    """
    registry = get_registry()
    extension = registry.build("positions", strategy, params)  # unknown names: a did-you-mean error
    table = position_table(model)
    if table is None:
        raise UnsupportedModelError(
            f"{describe_model(model)} has no learned absolute position table to extend (its adapter names none: "
            "rotary or relative positions need no extension)"
        )
    rows = table.rows
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < rows:
        raise ConfigError(f"--max-positions must be an integer of at least the model's {rows} positions, got "
                          f"{max_positions!r} (shrinking a table is not an extension)")
    old = table.module
    base = old.weight.detach()
    trained = trained_positions(model)
    if trained is not None and trained < rows < max_positions:  # rows past the trained ones are derived: redo them
        base = base[:trained]
    with torch.no_grad():
        weight = extension.extend(base, max_positions)
    if tuple(weight.shape) != (max_positions, old.embedding_dim):
        raise TypeError(f"positions strategy {strategy!r} returned a table of shape {tuple(weight.shape)}; expected "
                        f"({max_positions}, {old.embedding_dim})")
    _swap_table(model, table, weight)
    if is_converted(model):
        _record(model, strategy, registry.validate_params("positions", strategy, params).model_dump(mode="json"), rows)
    return model


def trained_positions(model: nn.Module) -> int | None:
    """The rows of a converted model's position table that were trained, when its GSA config records an
    extension (None: not recorded, every row counts as trained)."""
    data = getattr(getattr(model, "config", None), "gsa", None)
    long_context = data.get("long_context") if isinstance(data, Mapping) else None
    value = long_context.get("trained_positions") if isinstance(long_context, Mapping) else None
    return value if isinstance(value, int) else None


def record_training_context(model: nn.Module, context: int) -> None:
    """A converted model with a recorded extension was trained on rows of ``context`` tokens: its first
    ``context`` rows are trained now (a later extension keeps them)."""
    trained = trained_positions(model)
    if trained is None or context <= trained:
        return
    cfg = GSAConfig.from_model_config(model.config)
    data = cfg.to_dict()
    data["long_context"]["trained_positions"] = min(context, position_limit(model) or context)
    model.config.gsa = GSAConfig.from_dict(data, source="the trained model's GSA config").to_dict()


def keep_trained_positions(model: nn.Module, trained: int, strategy: str = "tile",
                           params: Mapping[str, Any] | None = None) -> int | None:
    """After training on rows of ``trained`` tokens: remake the table's rows past them from the trained ones.

    Why: those rows never received a gradient (they keep their random initialisation), and an input longer
    than the training rows would read them silently. ``strategy`` (a registered ``positions`` name that keeps
    the trained rows, :func:`gsa_core.positions.keeps_trained_rows`) rebuilds them from the trained rows, the
    table keeping its size (``tile``: copies, as Longformer did); ``none`` cuts the table to the trained rows,
    so a longer input gets the one limit error naming the strategies. A converted model records the extension
    (``long_context.trained_positions``), so later extensions start from the trained rows. Returns the
    table's rows afterwards (None: the model has no learned table; unchanged when ``trained`` covers it).
    """
    registry = get_registry()
    registry.get("positions", strategy)  # an unknown name: a did-you-mean error, before anything changes
    if not keeps_trained_rows(strategy):
        raise ConfigError(f"positions {strategy!r} moves the trained rows; filling rows that were never trained "
                          "needs a strategy that keeps them (tile) or none")
    table = position_table(model)
    if table is None or trained >= table.rows:
        return None if table is None else table.rows
    rows = table.rows
    with torch.no_grad():
        _swap_table(model, table, table.module.weight.detach()[:trained].clone())
    with contextlib.suppress(PositionLimitError):  # 'none' (or a plugin's like it): no rows past the trained ones
        extend_positions(model, rows, strategy, params)
    return position_limit(model)


def _swap_table(model: nn.Module, table: PositionTable, weight: Tensor) -> None:
    """Put an embedding holding ``weight`` where ``table`` was, and resize what depends on its rows."""
    old = table.module
    rows = int(weight.shape[0])
    new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx, device=old.weight.device,
                       dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    model.set_submodule(table.name, new)
    setattr(model.config, table.config_field, rows)
    adapter_for(model).positions_resized(model, rows)


def _record(model: nn.Module, strategy: str, params: dict[str, Any], rows: int) -> None:
    """Store the extension in the model's GSA config (validated), keeping the first trained length."""
    cfg = GSAConfig.from_model_config(model.config)
    trained = cfg.long_context.trained_positions or rows
    long_context = cfg.long_context.model_copy(update={"trained_positions": trained})
    data = cfg.to_dict()
    data["long_context"] = {**long_context.model_dump(mode="json"), "positions": {"name": strategy, "params": params}}
    model.config.gsa = GSAConfig.from_dict(data, source="the extended model's GSA config").to_dict()


__all__ = [
    "check_input_positions", "extend_positions", "extension_note", "keep_trained_positions", "position_limit",
    "position_table", "positions_needed", "record_training_context", "trained_positions",
]
