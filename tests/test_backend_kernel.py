"""The ``kernel`` backend: conformance kit, chunking, the recurrent state, registry and errors."""

from __future__ import annotations

import pytest
import torch

from gsa_core.bank import SplatBank
from gsa_core.errors import MaskNotSupportedError, ParamsError
from gsa_core.masks import MaskSpec
from gsa_core.registry import get_registry
from gsa_core.testing import (
    check_backend,
    check_causal,
    check_gradcheck,
    check_matches_reference,
    check_padding,
    check_prefill_then_step,
    relative_rmse,
)
from gsa_core.testing.strategies import padding_mask
from gsa_plugins.backends.dense import DenseBackend
from gsa_plugins.backends.kernel import KernelBackend, KernelParams, KernelState

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with several threads, BLAS/OpenMP fork-join overhead dominates (and
    explodes on a loaded machine). Results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_bank(heads: int = 2, dim: int = 8, capacity: int = 12, covariance: str = "diagonal",
              seed: int = 0, dead: tuple[int, ...] = (3,)) -> SplatBank:
    bank = SplatBank(heads, dim, capacity, covariance)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bank.centers.copy_(torch.randn(bank.centers.shape, generator=g))
        bank.log_amplitude.copy_(torch.randn(bank.log_amplitude.shape, generator=g) * 0.5)
        bank.shape_params().copy_(torch.rand(bank.shape_params().shape, generator=g) - 0.5)
        for s in dead:
            bank.alive[:, s] = False
    return bank


def qkv(bank: SplatBank, batch: int, n_q: int, n_k: int, dv: int = 5, seed: int = 1, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    h, d = bank.n_heads, bank.head_dim
    return (torch.randn(batch, h, n_q, d, generator=g) * scale, torch.randn(batch, h, n_k, d, generator=g) * scale,
            torch.randn(batch, h, n_k, dv, generator=g))


def forward_and_grads(backend, q, k, v, bank, mask):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    bank.zero_grad(set_to_none=True)
    out, _ = backend.forward(q, k, v, bank, mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weight).sum().backward()
    grads = [q.grad, k.grad, v.grad, *(p.grad for p in bank.slot_parameters().values())]
    return out.detach(), grads


def assert_matches_dense(backend, q, k, v, bank, mask) -> None:
    out, grads = forward_and_grads(backend, q, k, v, bank, mask)
    ref, ref_grads = forward_and_grads(DenseBackend(), q, k, v, bank, mask)
    assert relative_rmse(out, ref) <= TOL
    for got, want in zip(grads, ref_grads, strict=True):
        assert relative_rmse(got, want) <= TOL
    with torch.no_grad():
        fast, _ = backend.forward(q, k, v, bank, mask)
    assert relative_rmse(fast, ref) <= TOL


def test_conformance_kit() -> None:
    check_backend(KernelBackend(), max_examples=12)


def test_conformance_kit_small_chunks() -> None:
    """Tiny chunks and blocks, so the kit's short sequences cross many chunk and block boundaries."""
    backend = KernelBackend(KernelParams(chunk_size=3, block_rows=24))
    check_matches_reference(backend, max_examples=8)
    check_causal(backend, max_examples=6)
    check_padding(backend, max_examples=6)
    check_prefill_then_step(backend, max_examples=6)
    check_gradcheck(backend, max_examples=2)


@pytest.mark.parametrize(("chunk", "n"), [(1, 1), (1, 6), (1, 23), (7, 6), (7, 50), (7, 129), (64, 1), (64, 50),
                                          (64, 129), (64, 200)])
def test_chunk_sizes_and_ragged_lengths(chunk: int, n: int) -> None:
    bank = make_bank()
    q, k, v = qkv(bank, 2, n, n)
    pad = padding_mask(2, n, seed=n, side="left")
    backend = KernelBackend(KernelParams(chunk_size=chunk, block_rows=2 * 2 * 2 * chunk))
    for mask in (MaskSpec(causal=True), MaskSpec(causal=True, key_padding=pad, query_padding=pad),
                 MaskSpec(key_padding=pad)):
        assert_matches_dense(backend, q, k, v, bank, mask)


@pytest.mark.parametrize("covariance", ["isotropic", "full"])
def test_covariance_kinds(covariance: str) -> None:
    bank = make_bank(covariance=covariance, dim=4)
    q, k, v = qkv(bank, 1, 70, 70)
    assert_matches_dense(KernelBackend(KernelParams(chunk_size=16)), q, k, v, bank, MaskSpec(causal=True))


@pytest.mark.parametrize(("n_q", "n_k", "offset"), [(5, 40, None), (40, 5, None), (9, 30, 4), (12, 12, -3),
                                                     (10, 3, 7)])
def test_causal_query_offsets(n_q: int, n_k: int, offset: int | None) -> None:
    """Causal attention of queries that are not aligned with the keys (a cache, or an explicit offset)."""
    bank = make_bank()
    q, k, v = qkv(bank, 2, n_q, n_k)
    mask = MaskSpec(causal=True, query_offset=offset, key_padding=padding_mask(2, n_k, seed=3, side="left"))
    assert_matches_dense(KernelBackend(KernelParams(chunk_size=4)), q, k, v, bank, mask)


def test_cross_attention_with_padding() -> None:
    bank = make_bank()
    q, k, v = qkv(bank, 3, 17, 90)
    mask = MaskSpec(key_padding=padding_mask(3, 90, seed=1), query_padding=padding_mask(3, 17, seed=2))
    assert_matches_dense(KernelBackend(KernelParams(chunk_size=8, block_rows=96)), q, k, v, bank, mask)


def test_dominant_future_key_in_the_same_chunk() -> None:
    """A later key of the chunk dominating a splat by far more than fp32's range must not erase the
    visible terms of earlier rows (they are recomputed exactly)."""
    bank = SplatBank(1, 2, 2, "isotropic")
    with torch.no_grad():
        bank.centers.copy_(torch.tensor([[[0.0, 0.0], [30.0, 0.0]]]))
        bank.log_scale.zero_()
    # query 0 sits on splat 1; key 0 is e^-100 away from it, key 2 sits on it (a future key for rows 0, 1)
    q = torch.tensor([[[[30.0, 0.0], [30.0, 0.0], [0.0, 0.0], [0.0, 1.0]]]])
    k = torch.tensor([[[[30.0, 200.0**0.5], [0.0, 1.0], [30.0, 0.0], [0.0, 0.5]]]])
    v = torch.randn(1, 1, 4, 3, generator=torch.Generator().manual_seed(0))
    mask = MaskSpec(causal=True)
    out, grads = forward_and_grads(KernelBackend(KernelParams(chunk_size=4)), q, k, v, bank, mask)
    ref, ref_grads = forward_and_grads(DenseBackend(), q, k, v, bank, mask)
    assert torch.allclose(out[..., :2, :], v[..., :1, :].expand(-1, -1, 2, -1), atol=1e-6)  # rows 0, 1: key 0 only
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        fast, _ = KernelBackend(KernelParams(chunk_size=4)).forward(q, k, v, bank, mask)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):  # the gradients are tiny here: absolute tolerance
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fully_masked_rows_give_zeros() -> None:
    bank = make_bank()
    q, k, v = qkv(bank, 2, 10, 10)
    kp = torch.zeros(2, 10, dtype=torch.bool)
    kp[1, 6:] = True
    out, _ = KernelBackend(KernelParams(chunk_size=4)).forward(q, k, v, bank, MaskSpec(causal=True, key_padding=kp))
    assert torch.all(out[0] == 0) and torch.all(out[1, :, :6] == 0)
    assert torch.isfinite(out).all()


def test_output_dtype_follows_values() -> None:
    bank = make_bank()
    q, k, v = qkv(bank, 1, 20, 20)
    out, info = KernelBackend().forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), bank, MaskSpec(causal=True))
    assert out.dtype == torch.bfloat16 and info["backend"] == "kernel"


def test_state_size_does_not_depend_on_length() -> None:
    bank = make_bank()
    backend = KernelBackend(KernelParams(chunk_size=8))
    sizes = set()
    for n in (3, 40, 200):
        q, k, v = qkv(bank, 2, n, n)
        _, state = backend.prefill(q, k, v, bank, MaskSpec(causal=True))
        assert isinstance(state, KernelState)
        assert state.z.shape == (2, bank.n_heads, bank.capacity)
        assert state.M.shape == (2, bank.n_heads, bank.capacity, 5)
        sizes.add(state.nbytes())
    init = backend.init_state(bank, 2, 5, torch.device("cpu"))
    assert sizes == {init.nbytes()}


@pytest.mark.parametrize("grad", [True, False])
def test_prefill_then_step_and_padded_steps(grad: bool) -> None:
    bank = make_bank()
    backend = KernelBackend(KernelParams(chunk_size=8))
    n, m = 21, 9
    q, k, v = qkv(bank, 2, n + m, n + m)
    full, _ = DenseBackend().forward(q, k, v, bank, MaskSpec(causal=True))
    with torch.set_grad_enabled(grad):
        stepped = _prefill_and_step(backend, bank, q, k, v, n)
    assert relative_rmse(stepped[0], full[0]) <= TOL
    # batch row 1 never absorbed the stepped tokens: its last output attends to the prefix only
    last_ref, _ = DenseBackend().forward(q[1:, :, -1:], k[1:, :, :n], v[1:, :, :n], bank, MaskSpec())
    assert relative_rmse(stepped[1:, :, -1:], last_ref) <= TOL


def _prefill_and_step(backend: KernelBackend, bank: SplatBank, q, k, v, n: int):
    m = q.shape[-2] - n
    out, state = backend.prefill(q[..., :n, :], k[..., :n, :], v[..., :n, :], bank, MaskSpec(causal=True))
    outs = [out]
    for t in range(n, n + m):
        sl = slice(t, t + 1)
        before = state
        pad = torch.tensor([[True], [False]])
        o, state = backend.step(q[..., sl, :], k[..., sl, :], v[..., sl, :], bank, state, key_padding=pad)
        assert torch.equal(state.z[1], before.z[1]) and torch.equal(state.M[1], before.M[1])
        outs.append(o)
    return torch.cat(outs, dim=-2).detach()


def test_prefill_state_covers_every_key() -> None:
    """With an explicit query offset the queries stop before the last key; the state still holds all keys."""
    bank = make_bank()
    backend = KernelBackend(KernelParams(chunk_size=4))
    q, k, v = qkv(bank, 2, 9, 20)
    mask = MaskSpec(causal=True, query_offset=2)
    out, state = backend.prefill(q[..., :8, :], k, v, bank, mask)
    ref, _ = DenseBackend().forward(q[..., :8, :], k, v, bank, mask)
    assert relative_rmse(out, ref) <= TOL
    o, _ = backend.step(q[..., 8:, :], k[..., -1:, :], v[..., -1:, :], bank, state)
    keys, values = torch.cat([k, k[..., -1:, :]], dim=-2), torch.cat([v, v[..., -1:, :]], dim=-2)
    ref_step, _ = DenseBackend().forward(q[..., 8:, :], keys, values, bank, MaskSpec())
    assert relative_rmse(o, ref_step) <= TOL


def test_registry_build_and_params() -> None:
    backend = get_registry().build("backend", "kernel", {"chunk_size": 16})
    assert isinstance(backend, KernelBackend) and backend.params.chunk_size == 16
    assert KernelParams().chunk_size == 64
    with pytest.raises(ParamsError, match="chunk_size"):
        get_registry().build("backend", "kernel", {"chunk_size": 0})


@pytest.mark.parametrize("mask", [MaskSpec(causal=True, window=4), MaskSpec(attend=torch.ones(1, 1, 6, 6).bool())])
def test_unsupported_masks(mask: MaskSpec) -> None:
    bank = make_bank()
    q, k, v = qkv(bank, 1, 6, 6)
    kind = "window" if mask.window else "arbitrary"
    with pytest.raises(MaskNotSupportedError, match=kind):
        KernelBackend().forward(q, k, v, bank, mask)
