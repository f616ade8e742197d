"""The ``sparse`` backend: conformance with k >= K, and top-k semantics against a naive reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gsa_core.errors import MaskNotSupportedError, ParamsError
from gsa_core.masks import MaskSpec
from gsa_core.numerics import safe_softmax
from gsa_core.protocols import RecurrentBackend
from gsa_core.registry import get_registry
from gsa_core.testing import check_backend, relative_rmse
from gsa_core.testing.strategies import BankSpec, padding_mask, random_qkv
from gsa_plugins.backends.dense import DenseBackend, pair_log_weights
from gsa_plugins.backends.sparse import SparseBackend, SparseParams, segmented_prefix, top_k_slots

TOL = 1e-4


def sparse(top_k: int, scan_block: int = 16) -> SparseBackend:
    return SparseBackend(SparseParams(top_k=top_k, scan_block=scan_block))


# ----------------------------------------------------------------------------- naive reference
def sparsify(logf: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep each row's top-k features (ties to the lower slot, via a stable sort); the rest -inf."""
    idx = torch.sort(logf.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    keep = torch.zeros_like(logf, dtype=torch.bool).scatter(-1, idx, True)
    return logf.masked_fill(~keep, float("-inf"))


def naive(q, k, v, bank, mask: MaskSpec, top_k: int) -> torch.Tensor:
    """Dense GSA attention over explicitly top-k-sparsified features."""
    lq, lk = sparsify(bank.log_features(q), top_k), sparsify(bank.log_features(k), top_k)
    logw = pair_log_weights(lq, lk)
    logw = logw.masked_fill(~mask.allowed(q.shape[-2], k.shape[-2]), float("-inf"))
    out = safe_softmax(logw, dim=-1) @ v.to(logw.dtype)
    if mask.query_padding is not None:
        out = out * mask.query_padding[:, None, :, None].to(out)
    return out.to(v.dtype)


def outputs_and_grads(fn, q, k, v, bank):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bank.zero_grad(set_to_none=True)
    out = fn(q, k, v)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * weight).sum().backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad} | {n: p.grad for n, p in bank.slot_parameters().items()}
    return out.detach(), grads


def assert_matches(fn_a, fn_b, q, k, v, bank):
    out_a, grads_a = outputs_and_grads(fn_a, q, k, v, bank)
    out_b, grads_b = outputs_and_grads(fn_b, q, k, v, bank)
    assert relative_rmse(out_a, out_b) <= TOL
    scale = max(g.square().mean().sqrt().item() for g in grads_b.values() if g is not None)
    for name, g_b in grads_b.items():
        if g_b is None:
            continue
        assert grads_a[name] is not None, name
        assert torch.isfinite(grads_a[name]).all(), name
        assert relative_rmse(grads_a[name], g_b, floor=1e-2 * scale) <= TOL, name


# ----------------------------------------------------------------------------- k >= K: equals dense
@pytest.mark.parametrize("scan_block", [3, 16])
def test_conformance_kit_with_k_at_least_capacity(scan_block):
    backend = sparse(top_k=16, scan_block=scan_block)  # the kit's banks hold at most 12 slots
    assert isinstance(backend, RecurrentBackend)
    check_backend(backend, max_examples=8 if scan_block == 3 else 20)


def test_k_at_least_alive_equals_dense_with_dead_slots():
    bank = BankSpec(2, 4, 12, "diagonal", seed=5, dead_fraction=0.7).make()
    alive = int(bank.alive.sum(-1).max())
    backend = sparse(top_k=alive)
    assert backend.is_exact(bank) and not sparse(top_k=alive - 1).is_exact(bank)
    q, k, v = random_qkv(bank, 2, 30, 30, 5, seed=1)
    for mask in (MaskSpec(causal=True), MaskSpec()):
        assert_matches(lambda q, k, v, m=mask: backend.forward(q, k, v, bank, m)[0],
                       lambda q, k, v, m=mask: DenseBackend().forward(q, k, v, bank, m)[0], q, k, v, bank)


# ----------------------------------------------------------------------------- k < K: naive reference
def _masks(batch: int, n_q: int, n_k: int, seed: int) -> dict[str, MaskSpec]:
    return {
        "causal": MaskSpec(causal=True),
        "causal+padding": MaskSpec(causal=True, key_padding=padding_mask(batch, n_k, seed, side="left"),
                                   query_padding=padding_mask(batch, n_q, seed, side="left")),
        "bidirectional": MaskSpec(),
        "bidirectional+padding": MaskSpec(key_padding=padding_mask(batch, n_k, seed),
                                          query_padding=padding_mask(batch, n_q, seed + 1)),
    }


@pytest.mark.parametrize("covariance", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("top_k", [1, 3, 7])
@pytest.mark.parametrize("mask_name", ["causal", "causal+padding", "bidirectional", "bidirectional+padding"])
def test_top_k_matches_naive_reference(covariance, top_k, mask_name):
    bank = BankSpec(2, 4, 24, covariance, seed=top_k, dead_fraction=0.3, log_normalizer=top_k == 3).make()
    q, k, v = random_qkv(bank, 2, 45, 45, 6, seed=11 * top_k)
    mask = _masks(2, 45, 45, seed=top_k)[mask_name]
    backend = sparse(top_k, scan_block=8)  # small tiles: a three-level scan
    assert_matches(lambda q, k, v: backend.forward(q, k, v, bank, mask)[0],
                   lambda q, k, v: naive(q, k, v, bank, mask, top_k), q, k, v, bank)


def test_top_k_is_not_dense():
    bank = BankSpec(1, 4, 24, "diagonal", seed=0).make()
    q, k, v = random_qkv(bank, 1, 20, 20, 3, seed=0)
    out = sparse(2).forward(q, k, v, bank, MaskSpec(causal=True))[0]
    ref = DenseBackend().forward(q, k, v, bank, MaskSpec(causal=True))[0]
    assert relative_rmse(out, ref) > 1e-3


@pytest.mark.parametrize("n_q, offset", [(5, None), (5, 3), (9, -2)])
def test_cross_and_offset_queries(n_q, offset):
    bank = BankSpec(2, 4, 20, "diagonal", seed=2).make()
    q, k, v = random_qkv(bank, 2, n_q, 17, 4, seed=2)
    for mask in (MaskSpec(causal=True, query_offset=offset),
                 MaskSpec(key_padding=padding_mask(2, 17, 4), query_padding=padding_mask(2, n_q, 5))):
        assert_matches(lambda q, k, v, m=mask: sparse(4).forward(q, k, v, bank, m)[0],
                       lambda q, k, v, m=mask: naive(q, k, v, bank, m, 4), q, k, v, bank)


def test_causal_outputs_ignore_later_tokens():
    bank = BankSpec(2, 4, 32, "diagonal", seed=3).make()
    q, k, v = random_qkv(bank, 2, 80, 80, 5, seed=3)
    backend, mask, j = sparse(4, scan_block=8), MaskSpec(causal=True), 37
    out = backend.forward(q, k, v, bank, mask)[0]
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[..., j:, :] = torch.randn(t[..., j:, :].shape) * 3
    out2 = backend.forward(q2, k2, v2, bank, mask)[0]
    torch.testing.assert_close(out[..., :j, :], out2[..., :j, :], rtol=0, atol=1e-6)


def test_padding_changes_nothing_and_padded_queries_are_zero():
    bank = BankSpec(2, 4, 32, "full", seed=4).make()
    q, k, v = random_qkv(bank, 3, 25, 25, 5, seed=4)
    for mask in (_masks(3, 25, 25, 4)["causal+padding"], _masks(3, 25, 25, 4)["bidirectional+padding"]):
        out = sparse(5).forward(q, k, v, bank, mask)[0]
        pad = ~mask.key_padding[:, None, :, None]
        k2, v2 = torch.where(pad, torch.randn(k.shape) * 5, k), torch.where(pad, torch.randn(v.shape) * 5, v)
        torch.testing.assert_close(sparse(5).forward(q, k2, v2, bank, mask)[0], out, rtol=1e-5, atol=1e-6)
        padded = ~mask.query_padding[:, None, :].expand(-1, 2, -1)
        assert torch.all(out[padded] == 0)


def test_rows_with_no_visible_key_give_zeros_and_finite_grads():
    bank = BankSpec(1, 4, 16, "diagonal", seed=6, dead_fraction=0.3).make()
    q, k, v = (t.requires_grad_() for t in random_qkv(bank, 2, 10, 10, 3, seed=6))
    key_padding = torch.ones(2, 10, dtype=torch.bool)
    key_padding[1] = False  # every key of batch row 1 is padding
    key_padding[0, :4] = False  # and the first 4 queries of row 0 see no real key (causal)
    for mask in (MaskSpec(causal=True, key_padding=key_padding), MaskSpec(key_padding=key_padding)):
        out = sparse(3).forward(q, k, v, bank, mask)[0]
        assert torch.all(out[1] == 0)
        if mask.causal:
            assert torch.all(out[0, :, :4] == 0)
        out.square().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_disjoint_splats_give_zeros():
    """Queries near splat A and keys near splat B share no kept splat: zero weight, zero output."""
    bank = BankSpec(1, 2, 2, "isotropic", seed=0).make()
    with torch.no_grad():
        bank.centers.copy_(torch.tensor([[[10.0, 0.0], [-10.0, 0.0]]]))
        bank.log_scale.fill_(0.0)
    q = torch.tensor([[10.0, 0.0]]).expand(1, 1, 4, 2).contiguous()
    k = -q
    v = torch.randn(1, 1, 4, 3)
    for mask in (MaskSpec(causal=True), MaskSpec()):
        assert torch.all(sparse(1).forward(q, k, v, bank, mask)[0] == 0)
        assert not torch.all(sparse(2).forward(q, k, v, bank, mask)[0] == 0)


def test_gradcheck_top_k_fp64():
    bank = BankSpec(2, 2, 6, "diagonal", seed=7).make().double()
    q, k, v = (t.double().requires_grad_() for t in random_qkv(bank, 1, 6, 6, 2, seed=7))
    params = list(bank.slot_parameters().values())
    for mask in (MaskSpec(causal=True, key_padding=padding_mask(1, 6, 1, side="left")), MaskSpec()):
        def fn(q, k, v, *ps, mask=mask):
            return sparse(3, scan_block=4).forward(q, k, v, bank, mask)[0]

        assert fn(q, k, v).dtype == torch.float64
        assert torch.autograd.gradcheck(fn, (q, k, v, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- recurrent form
@pytest.mark.parametrize("n_prefill", [0, 1, 13])
def test_prefill_then_step_equals_forward_with_top_k(n_prefill):
    bank = BankSpec(2, 4, 32, "diagonal", seed=8, dead_fraction=0.3).make()
    n = 24
    q, k, v = random_qkv(bank, 2, n, n, 5, seed=8)
    key_padding = padding_mask(2, n, 8, side="left")
    backend = sparse(4, scan_block=8)
    full = backend.forward(q, k, v, bank, MaskSpec(causal=True, key_padding=key_padding))[0]
    if n_prefill:
        out_p, state = backend.prefill(q[..., :n_prefill, :], k[..., :n_prefill, :], v[..., :n_prefill, :], bank,
                                       MaskSpec(causal=True, key_padding=key_padding[:, :n_prefill]))
    else:
        out_p, state = q.new_zeros(2, 2, 0, 5), backend.init_state(bank, 2, 5, q.device)
    outs = [out_p]
    # decode in uneven groups: one token, then the rest two at a time
    t = n_prefill
    while t < n:
        width = 1 if t == n_prefill else 2
        sl = slice(t, min(n, t + width))
        o, state = backend.step(q[..., sl, :], k[..., sl, :], v[..., sl, :], bank, state,
                                key_padding=key_padding[:, sl])
        outs.append(o)
        t = sl.stop
    stepped = torch.cat(outs, dim=-2)
    assert state.log_norm.shape == (2, 2, 32) and state.memory.shape == (2, 2, 32, 5)
    real = key_padding[:, None, :, None].expand_as(full)
    assert relative_rmse(stepped[real], full[real]) <= TOL


def test_step_validates_its_inputs():
    bank = BankSpec(1, 4, 8, "diagonal", seed=0).make()
    backend = sparse(2)
    state = backend.init_state(bank, 1, 3, torch.device("cpu"))
    q, k, v = random_qkv(bank, 1, 2, 2, 3, seed=0)
    with pytest.raises(ValueError, match="as many queries"):
        backend.step(q, k[..., :1, :], v[..., :1, :], bank, state)
    with pytest.raises(ValueError, match="key_padding"):
        backend.step(q, k, v, bank, state, key_padding=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="state"):
        backend.step(q, k, v[..., :2], bank, state)


# ----------------------------------------------------------------------------- building blocks
def test_top_k_slots_breaks_ties_towards_the_lower_slot():
    logf = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, -torch.inf]])
    _, idx = top_k_slots(logf, 3)
    assert sorted(idx[0].tolist()) == [1, 2, 3]
    _, idx = top_k_slots(logf, 4)
    assert sorted(idx[0].tolist()) == [1, 2, 3, 4]
    values, idx = top_k_slots(logf, 10)
    assert values is logf and idx.shape == logf.shape
    many = torch.randn(50, 40).round()  # lots of ties
    _, idx = top_k_slots(many, 5)
    ref = torch.sort(many, dim=-1, descending=True, stable=True).indices[..., :5]
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize("block", [2, 3, 8, 64])
def test_segmented_prefix_matches_a_loop(block):
    g = torch.Generator().manual_seed(block)
    n, dv = 150, 3
    seg = torch.randint(0, 9, (n,), generator=g).sort().values
    logit = torch.randn(n, generator=g, dtype=torch.float64) * 30
    logit[torch.rand(n, generator=g) < 0.2] = float("-inf")
    val = torch.randn(n, dv, generator=g, dtype=torch.float64)
    z, u = segmented_prefix(seg, logit, val, block)
    for i in range(n):
        prev = (seg[: i + 1] == seg[i]).nonzero().flatten()
        ref_z = torch.logsumexp(logit[prev], 0)
        assert torch.allclose(z[i], ref_z) or (z[i] == ref_z == float("-inf"))
        w = torch.exp(logit[prev] - ref_z) if torch.isfinite(ref_z) else torch.zeros(len(prev), dtype=val.dtype)
        assert torch.allclose(u[i], (w.unsqueeze(-1) * val[prev]).sum(0))


# ----------------------------------------------------------------------------- registry and errors
def test_registered_with_validated_params():
    registry = get_registry()
    assert "sparse" in registry.names("backend")
    backend = registry.build("backend", "sparse", {"top_k": 4})
    assert isinstance(backend, SparseBackend) and backend.params.top_k == 4
    assert registry.build("backend", "sparse").params.top_k == 8
    with pytest.raises(ParamsError, match="top_k"):
        registry.build("backend", "sparse", {"top_k": 0})
    with pytest.raises(ParamsError, match="topk"):
        registry.build("backend", "sparse", {"topk": 4})


@pytest.mark.parametrize("mask, kind", [
    (MaskSpec(causal=True, window=4), "window"),
    (MaskSpec(attend=torch.ones(1, 1, 6, 6, dtype=torch.bool)), "arbitrary"),
])
def test_unsupported_masks_raise(mask, kind):
    bank = BankSpec(1, 4, 8, "diagonal", seed=0).make()
    q, k, v = random_qkv(bank, 1, 6, 6, 3, seed=0)
    with pytest.raises(MaskNotSupportedError, match=kind):
        sparse(2).forward(q, k, v, bank, mask)
    with pytest.raises(MaskNotSupportedError, match=kind):
        sparse(2).prefill(q, k, v, bank, dataclasses.replace(mask, causal=True))


def test_shape_errors():
    bank = BankSpec(2, 4, 8, "diagonal", seed=0).make()
    q, k, v = random_qkv(bank, 2, 6, 6, 3, seed=0)
    with pytest.raises(ValueError, match="key_padding"):
        sparse(2).forward(q, k, v, bank, MaskSpec(key_padding=torch.ones(2, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="mismatched"):
        sparse(2).forward(q, k, v[..., :5, :], bank, MaskSpec())
    with pytest.raises(ValueError, match="heads"):
        sparse(2).forward(q[:, :1], k[:, :1], v[:, :1], bank, MaskSpec())


def test_empty_sequences():
    bank = BankSpec(1, 4, 8, "diagonal", seed=0).make()
    q, k, v = random_qkv(bank, 1, 3, 0, 2, seed=0)
    assert torch.all(sparse(2).forward(q, k, v, bank, MaskSpec())[0] == 0)
    q, k, v = random_qkv(bank, 1, 0, 4, 2, seed=0)
    assert sparse(2).forward(q, k, v, bank, MaskSpec(causal=True))[0].shape == (1, 1, 0, 2)
