"""A fixed-size ring buffer of tensors: O(1) push, windowed reductions over the newest entries.

Storage is one preallocated tensor ``[capacity, *shape]``; pushing copies into the next row, so a
training step never allocates and the memory never grows. Reductions (``sum``, ``mean``, ``max``)
run over the newest ``last`` entries (default: all held), which is what windowed statistics need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class RingBuffer:
    """The newest ``capacity`` tensors of shape ``shape``.

    ``push(x)`` overwrites the oldest entry once full. ``values()`` returns the held entries oldest
    first. ``sum(last=n)`` / ``mean(last=n)`` reduce over the newest ``n`` entries.
    """

    def __init__(
        self,
        capacity: int,
        shape: Sequence[int] = (),
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"RingBuffer capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.shape = tuple(int(s) for s in shape)
        self.data = torch.zeros((capacity, *self.shape), dtype=dtype, device=device)
        self._next = 0  # row the next push writes
        self._count = 0  # rows held (<= capacity)
        self.pushed = 0  # total pushes since creation / clear

    # ----------------------------------------------------------------- writing
    @torch.no_grad()
    def push(self, x: Tensor | float) -> None:
        """Append ``x`` (broadcast to ``shape``), dropping the oldest entry when full. O(1)."""
        self.data[self._next].copy_(torch.as_tensor(x, dtype=self.data.dtype).expand(self.shape))
        self._next = (self._next + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)
        self.pushed += 1

    def clear(self) -> None:
        """Forget every entry (storage is kept)."""
        self.data.zero_()
        self._next = self._count = self.pushed = 0

    @torch.no_grad()
    def fill_where(self, mask: Tensor, value: float = 0.0) -> None:
        """Set ``value`` at ``mask`` (broadcast to ``shape``) in every held entry: forgets the history
        of some elements, e.g. the slots that were just rewritten."""
        self.data.masked_fill_(mask.to(self.data.device).expand(self.shape).unsqueeze(0), value)

    # ----------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count == self.capacity

    def _indices(self, last: int | None) -> Tensor:
        n = self._count if last is None else max(0, min(int(last), self._count))
        start = self._next - n
        return torch.arange(start, self._next, device=self.data.device) % self.capacity

    def held_mask(self) -> Tensor:
        """``bool [capacity]``: which storage rows hold an entry."""
        mask = torch.zeros(self.capacity, dtype=torch.bool, device=self.data.device)
        mask[self._indices(None)] = True
        return mask

    def values(self, last: int | None = None) -> Tensor:
        """The newest ``last`` entries (all held by default), oldest first: ``[n, *shape]``."""
        if last is None and self._count == self.capacity and self._next == 0:
            return self.data
        return self.data.index_select(0, self._indices(last))

    def latest(self) -> Tensor:
        """The newest entry (raises when empty)."""
        if self._count == 0:
            raise IndexError("latest() of an empty RingBuffer")
        return self.data[(self._next - 1) % self.capacity]

    def sum(self, last: int | None = None) -> Tensor:
        """Sum of the newest ``last`` entries (zeros when empty)."""
        n = self._count if last is None else min(int(last), self._count)
        if n == self._count and (self._count == self.capacity or self._next == self._count):
            return self.data[: self._count].sum(0)  # all held entries: no gather needed
        return self.values(last).sum(0)

    def mean(self, last: int | None = None) -> Tensor:
        """Mean of the newest ``last`` entries (zeros when empty)."""
        n = self._count if last is None else max(0, min(int(last), self._count))
        return self.sum(last) / max(n, 1)

    def max(self, last: int | None = None) -> Tensor:
        """Element-wise max of the newest ``last`` entries (raises when empty)."""
        vals = self.values(last)
        if vals.shape[0] == 0:
            raise ValueError("max() of an empty window")
        return vals.amax(0)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.clone(), "next": self._next, "count": self._count, "pushed": self.pushed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        if tuple(data.shape) != (self.capacity, *self.shape):
            raise ValueError(f"RingBuffer state of shape {tuple(data.shape)} does not fit "
                             f"capacity {self.capacity} x {self.shape}")
        self.data.copy_(data)
        self._next, self._count, self.pushed = int(state["next"]), int(state["count"]), int(state["pushed"])

    def to(self, device: torch.device | str) -> RingBuffer:
        self.data = self.data.to(device)
        return self

    def __repr__(self) -> str:
        return f"RingBuffer(capacity={self.capacity}, shape={self.shape}, held={self._count})"
