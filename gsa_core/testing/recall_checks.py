"""Conformance checks for recall policies, and the naive reference of attention with a recall cache.

``check_recall_policy(MyPolicy(budget=8))`` property-tests the invariants of
:class:`gsa_core.protocols.RecallPolicy`. :func:`reference_recall_attention` is the semantics of
``gsa_core.recall`` written out token by token, with sets of key indices and dense float64 GSA (no state,
no kept tensors, no trimming): the yardstick a layer's chunked process is held to.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.numerics import NEG_INF, safe_lse_softmax
from gsa_core.protocols import RecallPolicy
from gsa_core.recall import RecallCandidates
from gsa_core.reference import pair_log_weights
from gsa_core.testing.policy_checks import _property


# ----------------------------------------------------------------------------- the policy's invariants
@st.composite
def recall_candidates(draw: st.DrawFn, *, with_readout: bool) -> RecallCandidates:
    """Candidates of 1-2 rows, 1-3 heads, 0-12 keys, some invalid; a readout with some empty states."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    batch, heads, m = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(0, 12))
    d, dv = draw(st.sampled_from((2, 4, 8))), draw(st.sampled_from((1, 3)))
    scale = draw(st.sampled_from((1e-3, 1.0, 30.0)))
    valid = torch.rand(batch, m, generator=g) < draw(st.sampled_from((0.5, 1.0)))
    readout = None
    if with_readout:
        lse = torch.randn(batch, heads, m, generator=g) * 5
        empty = torch.rand(batch, heads, 1, generator=g) < 0.3  # a state that has absorbed nothing yet
        out = torch.randn(batch, heads, m, dv, generator=g).masked_fill(empty.unsqueeze(-1), 0.0)
        readout = (out, lse.masked_fill(empty, NEG_INF))
    return RecallCandidates(
        keys=torch.randn(batch, heads, m, d, generator=g) * scale,
        values=torch.randn(batch, heads, m, dv, generator=g) * scale,
        valid=valid,
        positions=torch.randint(0, 10_000, (batch, heads, m), generator=g),
        readout=readout,
    )


def _select(c: RecallCandidates, rows: Any, index: Tensor | None = None) -> RecallCandidates:
    """Rows ``rows`` and (when given) candidates ``index`` of ``c``."""

    def pick(t: Tensor, dim: int) -> Tensor:
        t = t[rows]
        return t if index is None else t.index_select(dim, index)

    readout = None if c.readout is None else (pick(c.readout[0], 2), pick(c.readout[1], 2))
    return RecallCandidates(pick(c.keys, 2), pick(c.values, 2), pick(c.valid, 1), pick(c.positions, 2), readout)


def _snapshot(c: RecallCandidates) -> list[Tensor]:
    return [t.clone() for t in (c.keys, c.values, c.valid, c.positions, *(c.readout or ()))]


def check_recall_policy(policy: RecallPolicy, *, max_examples: int = 25) -> None:
    """Shape and finiteness of the scores, purity, per-candidate scores (permutation, padding, batch rows)."""
    who = type(policy).__name__
    assert isinstance(policy, RecallPolicy), f"{policy!r} does not implement RecallPolicy"
    assert isinstance(policy.budget, int) and policy.budget >= 1, f"{who}: budget must be a positive int"
    assert isinstance(policy.block, int) and policy.block >= 1, f"{who}: block must be a positive int"

    @_property(recall_candidates(with_readout=bool(policy.uses_readout)), max_examples)
    def test(c: RecallCandidates) -> None:
        before = _snapshot(c)
        scores = policy.score(c)
        assert isinstance(scores, Tensor) and scores.is_floating_point(), f"{who}: scores must be a float tensor"
        assert tuple(scores.shape) == tuple(c.positions.shape), f"{who}: scores {tuple(scores.shape)}, expected " \
            f"{tuple(c.positions.shape)} [batch, heads, candidates]"
        valid = c.valid[:, None, :].expand_as(scores)
        assert torch.isfinite(scores[valid]).all(), f"{who}: a valid candidate got a non-finite score"
        assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(c), strict=True)), f"{who}: modified its inputs"
        assert torch.equal(policy.score(c), scores), f"{who}: the same candidates got different scores"
        m = c.positions.shape[-1]
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(m))
        permuted = policy.score(_select(c, slice(None), perm))
        torch.testing.assert_close(permuted, scores[..., perm], msg=f"{who}: a score depends on candidate order")
        real = c.valid[0].nonzero().flatten()
        alone = policy.score(_select(c, slice(0, 1), real))
        torch.testing.assert_close(alone, scores[:1, :, real],
                                   msg=f"{who}: invalid candidates or other batch rows changed a valid score")

    test()


# ----------------------------------------------------------------------------- the naive reference
def _readout(keys: Tensor, absorbed: Tensor, values: Tensor, bank: SplatBank) -> tuple[Tensor, Tensor]:
    """Dense GSA readout ``(out, lse)`` of query keys ``[1, H, m, d]`` against ``absorbed [1, H, s, d]``."""
    logw = pair_log_weights(bank.log_features(keys), bank.log_features(absorbed))  # [1, H, m, s]
    lse, p = safe_lse_softmax(logw)
    return p @ values, lse


def reference_recall_attention(q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, policy: RecallPolicy, *,
                               window: int = 0, valid: Tensor | None = None) -> Tensor:
    """Attention with a recall cache from its definition, in float64: GSA-space ``q, k [B, H, n, d]``, ``v``,
    ``valid [B, n]`` (real tokens) -> ``[B, H, n, d_v]``.

    Query ``t`` takes one softmax over the real keys ``j <= t``: the exact logit ``q_t·k_j`` for its window
    (``t - window < j``), the keys its head caches and (``policy.awaiting == "exact"``) the keys not yet
    candidates of a selection, the GSA log-weight for the rest. After every
    ``block``-th token ``T``, the undecided keys ``j <= T - max(window, 1)`` join each head's cache as
    candidates (cached first, then by position); the policy scores them (the readout is dense GSA over the
    head's absorbed keys); the ``budget`` best stay (valid first, higher score, then candidate order), the
    others are absorbed.
    """
    bank = copy.deepcopy(bank).double()
    exact_awaiting = policy.awaiting == "exact"
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, n, _ = q.shape
    valid = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=torch.float64)
    logw = pair_log_weights(bank.log_features(q), bank.log_features(k))  # [B, H, n, n]
    exact = q @ k.transpose(-1, -2)
    for b in range(batch):
        cached: list[list[int]] = [[] for _ in range(heads)]
        absorbed: list[list[int]] = [[] for _ in range(heads)]
        decided = 0  # keys j < decided have been candidates
        for t in range(n):
            for h in range(heads):
                keys = [j for j in range(t + 1) if valid[b, j]]
                if not keys:
                    continue
                use_exact = [(t - window < j) or (j in cached[h]) or (exact_awaiting and j >= decided) for j in keys]
                scores = torch.stack([exact[b, h, t, j] if e else logw[b, h, t, j] for j, e in zip(keys, use_exact,
                                                                                                   strict=True)])
                out[b, h, t] = torch.softmax(scores, dim=0) @ v[b, h, keys]
            if (t + 1) % policy.block:
                continue
            upto = t + 1 - max(window, 1)  # keys j <= upto left every future window
            new = [j for j in range(decided, upto + 1) if valid[b, j]]
            decided = max(decided, upto + 1)
            lists = [cached[h] + new for h in range(heads)]  # every head: the same number of candidates
            index = torch.tensor(lists, dtype=torch.long)  # [H, m]
            if index.shape[-1] == 0:
                continue
            cand_k = torch.stack([k[b, h, index[h]] for h in range(heads)]).unsqueeze(0)
            cand_v = torch.stack([v[b, h, index[h]] for h in range(heads)]).unsqueeze(0)
            readout = None
            if policy.uses_readout:
                if absorbed[0]:
                    idx = torch.tensor(absorbed, dtype=torch.long)
                    readout = _readout(cand_k, torch.stack([k[b, h, idx[h]] for h in range(heads)]).unsqueeze(0),
                                       torch.stack([v[b, h, idx[h]] for h in range(heads)]).unsqueeze(0), bank)
                else:
                    readout = (torch.zeros_like(cand_v), torch.full(index.shape, NEG_INF, dtype=torch.float64)[None])
            scores = policy.score(RecallCandidates(cand_k, cand_v, torch.ones(1, index.shape[-1], dtype=torch.bool),
                                                   index.unsqueeze(0), readout))[0]
            for h in range(heads):
                order = torch.sort(scores[h], descending=True, stable=True).indices.tolist()
                cached[h] = [lists[h][i] for i in order[:policy.budget]]
                absorbed[h] += [lists[h][i] for i in order[policy.budget:]]
    return out


__all__ = ["check_recall_policy", "recall_candidates", "reference_recall_attention"]
