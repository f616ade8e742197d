"""The recall cache's family-free pieces: its params, the exact keys it keeps, what a policy scores, the merge.

Why a recall cache (DESIGN.md section 7; LoLA, arXiv 2505.23666): a fixed-size state forgets exact
tokens, so beside it a layer keeps a small, fixed number of *exact* keys and values per head, chosen
by score by a registered policy (kind ``recall``, protocol :class:`gsa_core.protocols.RecallPolicy`).
The semantics, computed by ``gsa_plugins.adapters.recall_cache`` (docs/recall-and-evals.md):

- every ``block`` tokens (at absolute positions ``block, 2·block, ...``), the keys that left every future
  query's exact window since the last selection join the cached ones as *candidates*; the policy scores
  them; the ``budget`` best stay exact, the others are absorbed into the state (a key is either cached
  or in the state, never both). A decision about a key uses only the keys, values and state up to the
  moment it is made, so the selection is causal and any chunking of a prefill gives the same choices;
- a query's attention is one softmax over its exact window (hybrid layers), the cached keys (the exact
  logit ``q·k`` in GSA space, i.e. the host's ``scaling·q·k``), the keys still awaiting a selection
  (``awaiting = "exact"``, the default: their exact logit too, so the awaiting keys act as LoLA's sliding
  window at no extra memory, since they are kept anyway; ``"gsa"``: their GSA weight) and the state (its
  ``readout``, merged by its ``lse``).

Torch only; knows no model family.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.bank import compute_dtype
from gsa_core.numerics import NEG_INF, safe_logsumexp, safe_lse_softmax
from gsa_core.recurrent import BatchState
from gsa_core.registry import StrategyParams

#: Most exact keys per head, and most tokens between two selections: beyond, the cache is no longer small
#: (65,536 keys of a 64-dim head are 32 MiB per layer and sequence in fp32).
MAX_RECALL_BUDGET = 65_536


class RecallParams(StrategyParams):
    """What every recall policy is configured with: how many exact keys per head, and how often it chooses."""

    uses_readout: ClassVar[bool] = False  #: whether :meth:`score` reads ``candidates.readout``

    budget: int = Field(64, ge=1, le=MAX_RECALL_BUDGET, description="exact keys kept per head (B)")
    block: int = Field(64, ge=1, le=MAX_RECALL_BUDGET,
                       description="tokens between two selections (candidates wait at most this long)")
    awaiting: Literal["exact", "gsa"] = Field(
        "exact", description="how a query scores the keys awaiting the next selection: 'exact' (their exact logit, "
                             "as LoLA's sliding window; they are kept anyway, so no extra memory) or 'gsa' (their "
                             "GSA weight: a key between two selections is then not recalled exactly)",
    )


# ----------------------------------------------------------------------------- what is kept
@dataclasses.dataclass
class RecallSet(BatchState):
    """The exact keys one layer keeps, for a batch: fixed size ``budget`` per head whatever the length.

    ``keys [B, H, budget, d]`` (GSA space), ``values [B, H, budget, d_v]``, ``valid [B, budget]`` (every
    head keeps as many keys, the first ``valid.sum()`` slots), ``positions [B, H, budget]`` (absolute
    position of each kept key, -1 when empty) and ``seen [B]`` (tokens this row has seen, padding
    included: selections happen when it reaches a multiple of ``block``). Rows stack and split
    (:class:`~gsa_core.recurrent.BatchState`).
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    positions: Tensor
    seen: Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, budget: int, head_dim: int, value_dim: int, *,
              device: torch.device, dtype: torch.dtype, value_dtype: torch.dtype | None = None) -> RecallSet:
        """The set of a row that has seen nothing."""
        return cls(
            keys=torch.zeros(batch, heads, budget, head_dim, device=device, dtype=dtype),
            values=torch.zeros(batch, heads, budget, value_dim, device=device, dtype=value_dtype or dtype),
            valid=torch.zeros(batch, budget, dtype=torch.bool, device=device),
            positions=torch.full((batch, heads, budget), -1, dtype=torch.long, device=device),
            seen=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def budget(self) -> int:
        return int(self.keys.shape[-2])


@dataclasses.dataclass
class RecallCandidates:
    """What a policy scores: the cached keys followed by the new candidates, per head.

    ``keys [B, H, m, d]`` (GSA space), ``values [B, H, m, d_v]``, ``valid [B, m]`` (False: padding or an
    empty slot; its score is ignored), ``positions [B, H, m]`` (absolute positions) and, for a policy
    whose ``uses_readout`` is True, ``readout = (out [B, H, m, d_v], lse [B, H, m])``: the state's
    attention with each candidate's key as the query (what the state would give back for that key;
    ``lse = -inf`` and ``out = 0`` while the state is empty).
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    positions: Tensor
    readout: tuple[Tensor, Tensor] | None = None


def candidates(recall: RecallSet, keys: Tensor, values: Tensor, valid: Tensor, positions: Tensor) -> RecallCandidates:
    """The cached keys of ``recall`` followed by new candidates ``keys [B, H, n, d]``, ``valid [B, n]``,
    ``positions [B, n]``."""
    heads = keys.shape[1]
    return RecallCandidates(
        keys=torch.cat((recall.keys, keys.to(recall.keys.dtype)), dim=-2),
        values=torch.cat((recall.values, values.to(recall.values.dtype)), dim=-2),
        valid=torch.cat((recall.valid, valid), dim=-1),
        positions=torch.cat((recall.positions, positions[:, None, :].expand(-1, heads, -1)), dim=-1),
    )


def keep_best(recall: RecallSet, cands: RecallCandidates, scores: Tensor,
              at: Tensor) -> tuple[RecallSet, tuple[Tensor, Tensor, Tensor]]:
    """The ``budget`` best-scoring valid candidates of each head stay (rows where ``at [B]`` is True).

    Order: valid before invalid, then higher score first, then candidate order (a stable sort: cached
    keys before new ones, older before newer), so equal inputs give equal choices. Returns the new set
    and the evicted ``(keys [B, H, e, d], values, valid [B, e])``, to be absorbed into the state (none
    for rows where ``at`` is False, which keep their set).
    """
    batch, heads, m = scores.shape
    budget = recall.budget
    valid = cands.valid[:, None, :].expand(batch, heads, m)
    by_score = torch.sort(torch.where(valid, scores.detach(), NEG_INF), dim=-1, descending=True, stable=True).indices
    valid_first = torch.sort(torch.gather(valid, -1, by_score).to(torch.int8), dim=-1, descending=True,
                             stable=True).indices
    order = torch.gather(by_score, -1, valid_first)  # [B, H, m]

    def take(t: Tensor, idx: Tensor) -> Tensor:
        return torch.gather(t, 2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))

    n_valid = cands.valid.sum(-1)  # [B], the same for every head
    keep, drop = order[..., :budget], order[..., budget:]
    slots = torch.arange(budget, device=scores.device)
    row = at.view(batch, 1, 1)
    new = RecallSet(
        keys=torch.where(row.unsqueeze(-1), take(cands.keys, keep), recall.keys),
        values=torch.where(row.unsqueeze(-1), take(cands.values, keep), recall.values),
        valid=torch.where(at[:, None], slots < n_valid[:, None], recall.valid),
        positions=torch.where(row, torch.gather(cands.positions, -1, keep), recall.positions),
        seen=recall.seen,
    )
    evicted = torch.arange(drop.shape[-1], device=scores.device) < (n_valid - budget).clamp(min=0)[:, None]
    return new, (take(cands.keys, drop), take(cands.values, drop), evicted & at[:, None])


# ----------------------------------------------------------------------------- attention to the cached keys
def exact_readout(q: Tensor, recall: RecallSet) -> tuple[Tensor, Tensor]:
    """Softmax attention of GSA-space ``q [B, H, n, d]`` to the cached keys by their exact logit ``q·k``:
    ``(out [B, H, n, d_v], lse [B, H, n])`` in the compute dtype, like a state's ``readout`` (``lse = -inf``
    with zero output when nothing is cached), so the two merge exactly (:func:`merge_readouts`)."""
    dtype = compute_dtype(q)
    logits = q.to(dtype) @ recall.keys.to(dtype).transpose(-1, -2)  # [B, H, n, budget]
    logits = logits.masked_fill(~recall.valid[:, None, None, :], NEG_INF)
    lse, p = safe_lse_softmax(logits)
    return p @ recall.values.to(dtype), lse


def merge_readouts(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Attention to the union of two disjoint key sets from each one's ``(out, lse)``: weights ``e^{lse - lse_all}``
    (exact, one normaliser; zero output and ``-inf`` when neither sees a key; finite gradients)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    lse = safe_logsumexp(torch.stack((lse_a, lse_b)), dim=0)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa, wb = torch.exp(lse_a - ref).unsqueeze(-1), torch.exp(lse_b - ref).unsqueeze(-1)
    return wa * out_a.to(dtype) + wb * out_b.to(dtype), lse


__all__ = [
    "MAX_RECALL_BUDGET", "RecallCandidates", "RecallParams", "RecallSet", "candidates", "exact_readout",
    "keep_best", "merge_readouts",
]
