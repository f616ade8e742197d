"""Property checks for position extensions (kind ``positions``, :class:`gsa_core.protocols.PositionExtension`).

One line per plugin: ``check_position_extension(MyStrategy())``. Tables of every small shape, float32
and float64, ordinary and huge magnitudes, are drawn by hypothesis; the invariants of the protocol's
docstring are asserted, plus the optional properties a strategy declares (``keeps_prefix``: the first
``P`` rows are the trained ones, as ``tile``; ``keeps_endpoints``: the first and last rows are, as
``interpolate``; ``bounded``: every row lies within the trained rows' range per dimension, as any
convex combination of trained rows does).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from gsa_core.positions import PositionLimitError
from gsa_core.protocols import PositionExtension
from gsa_core.testing.policy_checks import _property


@st.composite
def position_tables(draw: st.DrawFn, max_rows: int = 24, max_dim: int = 6) -> tuple[torch.Tensor, int]:
    """``(table [P, d], n_positions)`` with ``n_positions`` from ``P`` to a few times ``P``."""
    rows, dim = draw(st.integers(1, max_rows)), draw(st.integers(1, max_dim))
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    scale = draw(st.sampled_from((1e-3, 1.0, 1e4)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    table = (torch.randn(rows, dim, generator=g, dtype=torch.float64) * scale).to(dtype)
    n = draw(st.one_of(st.just(rows), st.integers(rows, 4 * rows + 3)))
    return table, n


def check_position_extension(strategy: Any, *, keeps_prefix: bool = False, keeps_endpoints: bool = False,
                             bounded: bool = False, max_examples: int = 40) -> None:
    """``extend(table, n)``: ``[n, d]`` in the table's dtype; ``n == P`` gives the table; finite; the table is
    untouched; deterministic; fewer rows than ``P`` refused; a strategy that cannot extend raises
    :class:`~gsa_core.positions.PositionLimitError` naming ``P`` and ``n``."""
    assert isinstance(strategy, PositionExtension), f"{strategy!r} does not implement PositionExtension"
    who = type(strategy).__name__

    @_property(position_tables(), max_examples)
    def test(example: tuple[torch.Tensor, int]) -> None:
        table, n = example
        rows, dim = table.shape
        before = table.clone()
        try:
            out = strategy.extend(table, n)
        except PositionLimitError as exc:
            assert n > rows, f"{who}: refused {n} positions for a table of {rows} (nothing to extend)"
            assert (exc.limit, exc.needed) == (rows, n), f"{who}: the error names {exc.limit}/{exc.needed}"
            assert torch.equal(table, before), f"{who}: modified the table it was given"
            return
        assert torch.equal(table, before), f"{who}: modified the table it was given"
        assert isinstance(out, torch.Tensor) and tuple(out.shape) == (n, dim), (
            f"{who}: extend(table {tuple(table.shape)}, {n}) returned shape {tuple(getattr(out, 'shape', ()))}")
        assert out.dtype == table.dtype and out.device == table.device, f"{who}: changed dtype or device"
        assert bool(torch.isfinite(out).all()), f"{who}: non-finite rows from a finite table"
        assert out.data_ptr() != table.data_ptr() or out.numel() == 0, f"{who}: returned the table itself (aliased)"
        assert torch.equal(strategy.extend(table, n), out), f"{who}: not deterministic"
        if n == rows:
            assert torch.equal(out, table), f"{who}: n_positions == P must give the table's rows"
        if keeps_prefix:
            assert torch.equal(out[:rows], table), f"{who}: the first {rows} rows are not the trained ones"
        if keeps_endpoints:
            assert torch.equal(out[0], table[0]) and torch.equal(out[-1], table[-1]), (
                f"{who}: the first and last rows are not the trained first and last rows")
        if bounded:
            lo, hi = table.amin(0), table.amax(0)
            slack = 4 * torch.finfo(table.dtype).eps * table.abs().amax(0)  # rounding of a convex combination
            assert bool(((out >= lo - slack) & (out <= hi + slack)).all()), (
                f"{who}: rows outside the trained rows' range")
        if rows > 1:
            try:
                strategy.extend(table, rows - 1)
            except (ValueError, PositionLimitError):
                pass
            else:
                raise AssertionError(f"{who}: accepted fewer rows ({rows - 1}) than the table has ({rows})")

    test()


__all__ = ["check_position_extension", "position_tables"]
