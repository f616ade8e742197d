"""Learned absolute positions past their trained length: the one error, and what every strategy checks.

Why here: a model with a learned position table (GPT-Neo's ``wpe``: 2048 rows for TinyStories) cannot
index past its last row; torch would fail deep inside ``torch.embedding`` with an ``IndexError``. The
model's forward, ``generate()``, the evaluation commands and ``gsa train`` all raise
:class:`PositionLimitError` instead, one message naming the limit and the registered ``positions``
strategies that extend it (:class:`gsa_core.protocols.PositionExtension`; built-ins ``interpolate``,
``tile`` and ``none`` in ``gsa_plugins.positions``). Knows no model family.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from gsa_core.errors import GSAError

#: The command that extends a saved model's positions (named in every message).
EXTEND_HINT = "gsa convert SRC DST --max-positions N --positions NAME"


class PositionLimitError(GSAError, ValueError):
    """An input needs more positions than the model's learned position table holds.

    ``needed``: positions the input needs (its last position + 1); ``limit``: the table's rows;
    ``options``: the registered ``positions`` strategy names; ``extended``: how the table was
    extended before (``"interpolate from 64"``), if it was.
    """

    def __init__(self, needed: int, limit: int, options: Sequence[str] = (), *, extended: str | None = None,
                 what: str = "the input") -> None:
        self.needed, self.limit, self.options, self.extended = needed, limit, tuple(options), extended
        names = ", ".join(n for n in self.options if n != "none") or "(none registered)"
        before = f", already extended ({extended})" if extended else ""
        super().__init__(
            f"{what} needs {needed:,} positions, but this model has {limit:,} learned positions "
            f"(max_position_embeddings = {limit}{before}). Extend its position table with a registered "
            f"strategy: {EXTEND_HINT} (NAME: {names}; 'none' keeps the table and stops here), or in Python "
            "gsa_plugins.adapters.positions.extend_positions(model, N, NAME); or shorten the input"
        )


def registered_strategies() -> list[str]:
    """The names of the registered ``positions`` strategies (what the message lists)."""
    from gsa_core.registry import get_registry

    return get_registry().names("positions")


def check_positions(needed: int, limit: int | None, *, extended: str | None = None,
                    what: str = "the input") -> None:
    """Raise :class:`PositionLimitError` when ``needed`` positions do not fit a table of ``limit`` rows
    (``limit`` None: the model has no learned table, so nothing to check)."""
    if limit is not None and needed > limit:
        raise PositionLimitError(needed, limit, registered_strategies(), extended=extended, what=what)


def check_table(table: Tensor, n_positions: int) -> int:
    """Validate ``extend(table, n_positions)`` arguments once for every strategy; returns the table's rows.

    A table is ``[P, d]`` with ``P >= 1``; an extension asks for ``n_positions >= P`` rows (shrinking a
    table is not an extension: slice it instead).
    """
    if table.dim() != 2 or table.shape[0] < 1:
        raise ValueError(f"a position table is [positions, dim] with at least one row, got {tuple(table.shape)}")
    if isinstance(n_positions, bool) or not isinstance(n_positions, int):
        raise TypeError(f"n_positions must be an int, got {type(n_positions).__name__}")
    rows = int(table.shape[0])
    if n_positions < rows:
        raise ValueError(f"cannot extend a table of {rows} positions to {n_positions}: an extension keeps at "
                         "least every trained position")
    return rows


def keeps_trained_rows(strategy: str) -> bool:
    """Whether the registered strategy ``strategy`` leaves the rows it extends from unchanged (``tile``, ``none``;
    not ``interpolate``, which moves every position into the stretched range): probed on a small random table,
    so a plugin's strategy is judged by what it does. Filling rows that were never trained needs this; extending
    a table for a longer context does not."""
    import torch

    from gsa_core.registry import get_registry

    table = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        out = get_registry().build("positions", strategy).extend(table, 8)
    except PositionLimitError:  # 'none': no rows added, the trained ones kept
        return True
    return bool(torch.equal(out[:4], table))


__all__ = ["EXTEND_HINT", "PositionLimitError", "check_positions", "check_table", "keeps_trained_rows",
           "registered_strategies"]
