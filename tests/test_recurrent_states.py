"""Stacked states and stored pasts (what serving batches), and the FLOP counts backends report."""

from __future__ import annotations

import itertools

import pytest
import torch

from gsa_core.config import GSAConfig
from gsa_core.flops import visible_pairs
from gsa_core.recurrent import split_state, stack_states
from gsa_core.registry import get_registry
from gsa_core.testing import relative_rmse
from gsa_core.testing.strategies import BankSpec
from gsa_plugins.adapters.layers import GSALayer
from gsa_plugins.adapters.past import LayerPast
from gsa_plugins.backends.kernel import KernelBackend, KernelState
from gsa_plugins.backends.sparse import SparseBackend, SparseState

TOL = 1e-4  # the kit's fp32 agreement bound (DESIGN.md section 2)


def test_stack_rejects_mismatched_states():
    bank = BankSpec(2, 4, 6, "diagonal", seed=0).make()
    kernel, sparse = KernelBackend(), SparseBackend()
    a = kernel.init_state(bank, 2, 3, torch.device("cpu"))
    assert [s.batch_size for s in split_state(a)] == [1, 1] and a.select(-1).batch_size == 1
    with pytest.raises(ValueError, match="'M' differ"):
        stack_states([a, kernel.init_state(bank, 1, 4, torch.device("cpu"))])
    with pytest.raises(TypeError, match="cannot stack a SparseState"):
        KernelState.stack([a, sparse.init_state(bank, 1, 3, torch.device("cpu"))])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        stack_states([])
    with pytest.raises(IndexError, match="out of range"):
        a.select(2)
    assert isinstance(sparse.init_state(bank, 1, 3, torch.device("cpu")), SparseState)


def _layer(mode: str, backend: str) -> GSALayer:
    torch.manual_seed(0)
    cfg = GSAConfig.from_dict({"bank": {"n_splats": 6}, "backend": backend})
    return GSALayer(2, 4, cfg, mode=mode, hybrid_window=3 if mode == "hybrid" else None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "backend"), [("gsa", "kernel"), ("gsa", "sparse"), ("hybrid", "kernel")])
def test_stacked_pasts_decode_like_each_sequence_alone(mode, backend):
    """Sessions of different lengths (windows of different fill) stacked into one batch decode one step each
    as they would alone: what continuous batching of decode steps needs."""
    layer = _layer(mode, backend)
    plan = layer.decode_plan()
    g = torch.Generator().manual_seed(1)
    lengths = [1, 7, 4]
    pasts, new = [], []
    for n in lengths:
        q, k, v = (torch.randn(1, 2, n + 1, 4, generator=g) for _ in range(3))
        _, past = layer.decode(plan, q[..., :n, :], k[..., :n, :], v[..., :n, :], torch.ones(1, n, dtype=torch.bool),
                               None)
        pasts.append(past)
        new.append((q[..., n:, :], k[..., n:, :], v[..., n:, :]))
    stacked = LayerPast.stack(pasts)
    qs, ks, vs = (torch.cat([t[i] for t in new]) for i in range(3))
    out, batched = layer.decode(plan, qs, ks, vs, torch.ones(3, 1, dtype=torch.bool), stacked)
    one = torch.ones(1, 1, dtype=torch.bool)
    probe = [torch.randn(1, 2, 1, 4, generator=g) for _ in range(3)]
    for i, (past, (q, k, v)) in enumerate(zip(pasts, new, strict=True)):
        alone, after = layer.decode(plan, q, k, v, one, past)
        assert relative_rmse(out[i:i + 1], alone) <= TOL
        # split again, the row continues like the sequence that never left its own batch
        nxt, _ = layer.decode(plan, *probe, one, batched.select(i))
        ref, _ = layer.decode(plan, *probe, one, after)
        assert relative_rmse(nxt, ref) <= TOL


def test_visible_pairs_counts_the_causal_triangle():
    for n_q, n_k in itertools.product(range(7), range(7)):
        by_hand = sum(min(n_k, max(0, i + n_k - n_q + 1)) for i in range(n_q))
        assert visible_pairs(n_q, n_k, True) == by_hand
        assert visible_pairs(n_q, n_k, False) == n_q * n_k


def test_backends_report_flops():
    """Each count grows with the work; kernel's and sparse's equal the closed forms the attention benchmark's
    published figures used (causal n x n, diagonal covariance, d_v = d, chunk 64)."""
    registry = get_registry()
    bank = BankSpec(4, 16, 32, "diagonal", seed=0).make()
    for name in ("dense", "kernel", "sparse", "auto"):
        backend = registry.build("backend", name)
        short = backend.flops(1, 4, 128, 128, 16, 16, True, bank)
        long = backend.flops(1, 4, 1024, 1024, 16, 16, True, bank)
        assert 0 < short < long, name
    n, h, d, k, c, top, block = 512, 4, 16, 32, 64, 8, 64
    kernel_closed_form = h * n * (8 * d * k + 4 * k * d + 2 * c * (k + d))
    assert registry.build("backend", "kernel").flops(1, h, n, n, d, d, True, bank) == kernel_closed_form
    sparse = registry.build("backend", "sparse", {"top_k": top, "scan_block": block})
    sparse_closed_form = h * (8 * n * d * k + 2 * n * top * block * d + 2 * n * top * d)
    assert sparse.flops(1, h, n, n, d, d, True, bank) == sparse_closed_form
    dense = registry.build("backend", "dense")
    assert dense.flops(1, 4, 256, 256, 16, 16, True, bank) < dense.flops(1, 4, 256, 256, 16, 16, False, bank)
