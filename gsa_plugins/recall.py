"""Built-in recall policies (kind ``recall``): which keys a layer keeps exact beside its state.

- ``self-recall`` (LoLA, arXiv 2505.23666): a key whose value the state already gives back when asked
  with that key is safe to absorb; the keys it reproduces worst (largest ``||v - readout(k)||²``) stay
  exact. Filler that repeats is reproduced well; a rare token (a number hidden in text) is not.
- ``recent``: the newest keys stay exact, i.e. the cache is a longer exact window: the baseline that
  shows what choosing by score adds.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from gsa_core.recall import RecallCandidates, RecallParams


class SelfRecall(RecallParams):
    """Keeps the keys whose values the state reproduces worst (LoLA's self-recall error)."""

    uses_readout: ClassVar[bool] = True

    def score(self, candidates: RecallCandidates) -> Tensor:
        assert candidates.readout is not None, "self-recall scores the state's readout of each candidate"
        out, _ = candidates.readout
        return (candidates.values.to(out.dtype) - out).square().sum(-1)


class Recent(RecallParams):
    """Keeps the newest keys (the cache as a longer exact window; a baseline)."""

    def score(self, candidates: RecallCandidates) -> Tensor:
        return candidates.positions.to(torch.float64)


__all__ = ["Recent", "SelfRecall"]
