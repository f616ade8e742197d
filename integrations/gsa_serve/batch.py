"""The sessions that decode together: one stacked past, one forward per step, rows joining and leaving.

Why a live cache kept across steps: while the batch's members do not change, the runner's cache
(recurrent or transformers') is continued in place by the model, exactly as ``generate()`` would; only
when a session joins or leaves are the per-layer pasts taken out, stacked or selected
(``LayerPast.stack`` / ``select``) and a new live cache opened. Rows keep their own lengths and so
their own position ids. Leading key columns that no row uses any more (left padding of a session that
left) are trimmed, so a long-lived batch does not carry padding for sessions long gone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from gsa_plugins.adapters.past import LayerPast
from gsa_serve.runners import Runner, SessionPast


def trim_padding(past: LayerPast) -> LayerPast:
    """``past`` without the leading key columns that are padding in every row (kept keys are right-aligned)."""
    if past.valid is None or past.valid.shape[-1] == 0:
        return past
    used = past.valid.any(dim=0)
    first = int(used.to(torch.int8).argmax()) if bool(used.any()) else used.numel()
    if first == 0:
        return past
    assert past.keys is not None and past.values is not None
    # replace(): every other part of the past (a state, a recall cache) stays as it is
    return dataclasses.replace(past, keys=past.keys[..., first:, :], values=past.values[..., first:, :],
                               valid=past.valid[:, first:])


def prefill(runner: Runner, past: SessionPast | None, ids: Sequence[int]) -> tuple[Tensor, SessionPast]:
    """Continue ``past`` (None: a new session) by ``ids`` in one forward; returns the last logits ``[vocab]``."""
    start = 0 if past is None else past.length
    cache = runner.open(None if past is None else past.layers, start)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=runner.device)
    positions = torch.arange(start, start + len(ids), device=runner.device).unsqueeze(0)
    logits = runner.forward(cache, tokens, positions)
    return logits[0], SessionPast(tuple(runner.layers(cache)), start + len(ids))


class Batch:
    """The decoding sessions, in row order, with their stacked past in the runner's live cache."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.lengths: list[int] = []
        self._cache: object | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def _layers(self) -> list[LayerPast]:
        assert self._cache is not None
        return self.runner.layers(self._cache)

    def _reopen(self, layers: list[LayerPast]) -> None:
        self._cache = self.runner.open([trim_padding(p) for p in layers], max(self.lengths)) if self.lengths else None

    def add(self, past: SessionPast) -> int:
        """Append a session (after its prefill) as the last row; returns its row."""
        layers = list(past.layers) if self._cache is None else [
            LayerPast.stack([mine, theirs]) for mine, theirs in zip(self._layers(), past.layers, strict=True)]
        self.lengths.append(past.length)
        self._reopen(layers)
        return len(self.lengths) - 1

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); the others leave the batch."""
        if list(rows) == list(range(len(self.lengths))):
            return
        if not rows:
            self.lengths, self._cache = [], None
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.runner.device)
        layers = [p.select(index) for p in self._layers()]
        self.lengths = [self.lengths[r] for r in rows]
        self._reopen(layers)

    def session(self, row: int) -> SessionPast:
        """Row ``row``'s past as a session of its own (a copy: it does not pin the batch's memory)."""
        layers = tuple(trim_padding(p.select(row)) for p in self._layers())
        return SessionPast(layers, self.lengths[row]).detached()

    def step(self, tokens: Sequence[int]) -> Tensor:
        """Feed one token per row at each row's own position; returns the logits ``[rows, vocab]``."""
        assert self._cache is not None and len(tokens) == len(self.lengths)
        device = self.runner.device
        ids = torch.tensor(list(tokens), dtype=torch.long, device=device).unsqueeze(1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=device).unsqueeze(1)
        logits = self.runner.forward(self._cache, ids, positions)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def nbytes(self) -> int:
        """Bytes of the stacked pasts (states, kept keys and values, padding flags)."""
        return 0 if self._cache is None else sum(p.nbytes() for p in self._layers())


__all__ = ["Batch", "prefill", "trim_padding"]
