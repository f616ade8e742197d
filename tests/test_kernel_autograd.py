"""The kernel backend's hand-derived backward (``kernel_chunked.CausalKernel``): fp64 ``gradcheck`` on small
shapes (inputs, both states, the feature map's tensors), agreement with the autograd reference
(``kernel_naive``) and with ``dense``, and memory that does not grow with ``K·C`` per token (dominated rows:
``test_backend_kernel.py::test_dominant_future_key_in_the_same_chunk``, whose gradients come from this backward)."""

from __future__ import annotations

import pytest
import torch

from gsa_core.bank import SplatBank
from gsa_core.masks import MaskSpec
from gsa_core.testing import relative_rmse
from gsa_core.testing.backend_checks import GRAD_FLOOR
from gsa_core.testing.strategies import BankSpec, padding_mask
from gsa_plugins.backends.dense import DenseBackend
from gsa_plugins.backends.kernel import KernelBackend, KernelParams
from gsa_plugins.backends.kernel_chunked import CausalKernel, Plan, seen_rows
from gsa_plugins.backends.kernel_naive import causal_chunks_reference

TOL = 1e-4  # the conformance kit's relative RMSE against dense (fp32)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: several threads only add fork-join overhead. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bank(kind: str, seed: int, *, heads: int = 2, dim: int = 3, capacity: int = 4, dead: float = 0.0) -> SplatBank:
    return BankSpec(heads, dim, capacity, kind, seed, dead_fraction=dead, log_normalizer=seed % 2 == 1).make()


def _inputs(bank: SplatBank, batch: int, n: int, dv: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h, d = bank.n_heads, bank.head_dim
    return tuple(torch.randn(batch, h, n, w, generator=g, dtype=dtype) for w in (d, d, dv))


def _state(bank: SplatBank, batch: int, dv: int, seed: int, dtype=torch.float64):
    """A non-trivial incoming state (as after absorbing a prefix), with one splat never seen."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, bank.n_heads, bank.capacity, generator=g, dtype=dtype)
    z[..., -1] = float("-inf")
    M = torch.randn(batch, bank.n_heads, bank.capacity, dv, generator=g, dtype=dtype)
    M[..., -1, :] = 0.0
    return z, M


@pytest.mark.parametrize(("kind", "chunk", "step", "padded"), [("diagonal", 2, 4, False), ("isotropic", 3, 3, True),
                                                              ("full", 2, 6, True), ("diagonal", 4, 4, True)])
def test_gradcheck_fp64_with_states_and_feature_map(kind: str, chunk: int, step: int, padded: bool) -> None:
    """``torch.autograd.gradcheck`` of the whole Function: q, k, v, the incoming state (z0, M0), the feature map's
    weight, bias (and whitened centres), and every output (out, z, M), across chunk and block boundaries."""
    bank = _bank(kind, 3).double()
    batch, n, dv = 2, 7, 2
    q, k, v = _inputs(bank, batch, n, dv, 4)
    z0, M0 = _state(bank, batch, dv, 5)
    fmap = bank.feature_map(torch.float64)
    kp = padding_mask(batch, n, 6, side="left") if padded else None
    plan = Plan(fmap.kind, fmap.centre, fmap.alive, chunk, step, kp)
    white = fmap.white_centers.detach().requires_grad_() if fmap.white_centers is not None else None
    weight, bias = fmap.weight.detach().requires_grad_(), fmap.bias.detach().requires_grad_()
    z_live = torch.isfinite(z0)

    def fn(q, k, v, z_fin, M0, weight, bias, *white_):
        z = torch.where(z_live, z_fin, float("-inf"))  # keep the never-seen splat at -inf
        out, z1, M1 = CausalKernel.apply(q, k, v, z, M0, weight, bias, white_[0] if white_ else None, plan)
        return out, torch.where(torch.isfinite(z1), z1, 0.0), M1

    args = [t.requires_grad_() for t in (q, k, v, torch.where(z_live, z0, 0.0), M0)] + [weight, bias]
    args += [white] if white is not None else []
    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-6, rtol=1e-5)


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out, z, M = fn(*tensors)
    g = torch.Generator().manual_seed(9)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + (M * torch.randn(M.shape, generator=g, dtype=M.dtype)).sum()
    loss = loss + torch.where(torch.isfinite(z), z, 0.0).sum()
    return [out.detach(), *torch.autograd.grad(loss, tensors)]


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
def test_matches_autograd_reference(kind: str) -> None:
    """Against autograd through the reference forward (same features), fp32, states in and out, dead slots."""
    bank = _bank(kind, 7, heads=3, dim=4, capacity=6, dead=0.3)
    batch, n, dv, chunk = 2, 45, 3, 8
    q, k, v = _inputs(bank, batch, n, dv, 8, torch.float32)
    z0, M0 = _state(bank, batch, dv, 9, torch.float32)
    fmap = bank.feature_map()
    plan = Plan(fmap.kind, fmap.centre, fmap.alive, chunk, 16, None)

    def fast(q, k, v, M0):
        return CausalKernel.apply(q, k, v, z0, M0, fmap.weight, fmap.bias, fmap.white_centers, plan)

    def reference(q, k, v, M0):
        lq, lk = fmap(q), fmap(k)
        pad = -(-n // chunk) * chunk - n
        lq, lk = (torch.nn.functional.pad(t, (0, 0, 0, pad), value=float("-inf")) for t in (lq, lk))
        vp = torch.nn.functional.pad(v, (0, 0, 0, pad))
        seen = seen_rows(None, slice(0, n), z0, n + pad)
        out, z, M = causal_chunks_reference(lq, lk, vp, z0, M0, chunk, seen)
        return out[..., :n, :], z, M

    got, want = _grads(fast, (q, k, v, M0)), _grads(reference, (q, k, v, M0))
    for a, b in zip(got, want, strict=True):
        assert relative_rmse(a, b) <= TOL


@pytest.mark.parametrize("n", [1, 5, 64, 200])
def test_backend_gradients_match_dense(n: int) -> None:
    """Through the backend (features, padding, blocks), every gradient against dense, fp32."""
    bank = _bank("diagonal", 11, heads=2, dim=8, capacity=12, dead=0.3)
    q, k, v = _inputs(bank, 2, n, 5, 12, torch.float32)
    pad = padding_mask(2, n, 13, side="left")
    backend = KernelBackend(KernelParams(chunk_size=16, block_rows=2 * 2 * 48))
    for mask in (MaskSpec(causal=True), MaskSpec(causal=True, key_padding=pad, query_padding=pad),
                 MaskSpec(causal=True, query_offset=3)):
        results = []
        for be in (backend, DenseBackend()):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            bank.zero_grad(set_to_none=True)
            out, _ = be.forward(*leaves, bank, mask)
            (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
            results.append([out.detach(), *(t.grad for t in leaves),
                            *(p.grad.clone() for p in bank.slot_parameters().values())])
        for a, b in zip(*results, strict=True):  # a gradient that is zero up to round-off (dq with one key):
            assert relative_rmse(a, b, floor=GRAD_FLOOR) <= TOL  # compared against 1% of an O(1) scale


def _saved_bytes(n: int, heads: int = 2, dim: int = 16, capacity: int = 32) -> int:
    bank = _bank("diagonal", 1, heads=heads, dim=dim, capacity=capacity)
    q, k, v = (t.requires_grad_() for t in _inputs(bank, 1, n, dim, 2, torch.float32))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        KernelBackend(KernelParams(chunk_size=16, block_rows=heads * 64)).forward(q, k, v, bank, MaskSpec(causal=True))
    return sum(seen.values())


def test_saved_memory_is_linear_and_small() -> None:
    """What autograd keeps for the backward: the inputs, the output, one log-normaliser per row and a state per
    block: about ``(3d + dv + 1)·4`` bytes per token and head plus ``O(K·d)`` per block, nothing ``K``- or
    ``C``-wide per token (the autograd reference kept ``[n, C]`` and several ``[n, K]`` tensors)."""
    heads, dim, capacity = 2, 16, 32
    small, large = _saved_bytes(512), _saved_bytes(1024)
    per_token = (large - small) / 512 / heads
    block_states = (capacity * (dim + 1) * 4) / 64  # one (z, M) per 64-token block, per token
    assert per_token <= (3 * dim + dim + 1) * 4 + block_states + 1, per_token
    assert per_token - (3 * dim + dim) * 4 < capacity * 4  # beyond inputs and output: under one K-wide row
