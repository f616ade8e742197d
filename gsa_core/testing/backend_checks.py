"""Property checks every :class:`~gsa_core.protocols.AttentionBackend` must pass (DESIGN.md section 2).

``check_backend(MyBackend())`` runs all of them that apply to the backend's ``supported_masks``
(and the recurrent ones when it implements :class:`~gsa_core.protocols.RecurrentBackend`).
Each check draws its cases with hypothesis; failures name the case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.masks import MaskSpec
from gsa_core.protocols import AttentionBackend, RecurrentBackend
from gsa_core.testing.strategies import BankSpec, bank_specs, padding_mask, random_qkv

REL_RMSE_TOL = 1e-4
GRAD_FLOOR = 1e-2  # gradients below 1% of the largest one are compared relative to that 1%


def relative_rmse(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    """``rmse(actual - expected) / max(rmse(expected), floor)`` (absolute when that is zero).

    ``floor`` keeps a reference that is zero up to round-off (e.g. the query gradient with a
    single splat) from turning round-off into a relative error of 1.
    """
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).square().mean().sqrt().item()
    ref = max(expected.square().mean().sqrt().item(), floor)
    return err / ref if ref > 0 else err


def reference_backend() -> AttentionBackend:
    from gsa_plugins.backends.dense import DenseBackend

    return DenseBackend()


@dataclass(frozen=True)
class Case:
    """One drawn attention problem: a bank, sizes and a mask recipe."""

    bank: BankSpec
    batch: int
    n_q: int
    n_k: int
    value_dim: int
    seed: int
    mask_kind: str

    def mask(self) -> MaskSpec:
        kind, b, seed = self.mask_kind, self.batch, self.seed
        if kind == "causal":
            return MaskSpec(causal=True)
        if kind == "causal+padding":  # left padding, as in batched generation
            return MaskSpec(causal=True, key_padding=padding_mask(b, self.n_k, seed, side="left"),
                            query_padding=padding_mask(b, self.n_q, seed, side="left"))
        if kind == "window":
            return MaskSpec(causal=True, window=max(1, self.n_k // 3))
        if kind == "bidirectional":
            return MaskSpec()
        if kind == "bidirectional+padding":
            return MaskSpec(key_padding=padding_mask(b, self.n_k, seed),
                            query_padding=padding_mask(b, self.n_q, seed + 1))
        if kind == "cross":
            return MaskSpec(key_padding=padding_mask(b, self.n_k, seed),
                            query_padding=padding_mask(b, self.n_q, seed + 1))
        if kind == "arbitrary":
            g = torch.Generator().manual_seed(seed)
            return MaskSpec(attend=torch.rand(b, 1, self.n_q, self.n_k, generator=g) < 0.6)
        raise ValueError(f"unknown mask recipe {kind!r}")

    def tensors(self, bank: SplatBank, dtype: torch.dtype = torch.float32, scale: float = 1.0):
        q, k, v = random_qkv(bank, self.batch, self.n_q, self.n_k, self.value_dim, self.seed, scale)
        return q.to(dtype), k.to(dtype), v.to(dtype)


MASK_RECIPES: dict[str, frozenset[str]] = {
    "causal": frozenset({"causal"}),
    "causal+padding": frozenset({"causal", "key_padding", "query_padding"}),
    "window": frozenset({"causal", "window"}),
    "bidirectional": frozenset(),
    "bidirectional+padding": frozenset({"key_padding", "query_padding"}),
    "cross": frozenset({"cross", "key_padding", "query_padding"}),
    "arbitrary": frozenset({"arbitrary"}),
}


def recipes_for(backend: AttentionBackend) -> list[str]:
    return [name for name, kinds in MASK_RECIPES.items() if kinds <= backend.supported_masks]


@st.composite
def cases(draw: st.DrawFn, recipes: list[str], max_len: int = 40, **bank_kw: Any) -> Case:
    recipe = draw(st.sampled_from(recipes))
    n_k = draw(st.integers(1, max_len))
    n_q = draw(st.integers(1, max_len)) if recipe == "cross" else n_k
    if recipe == "cross" and n_q == n_k:
        n_q = n_k + 1
    return Case(
        bank=draw(bank_specs(**bank_kw)),
        batch=draw(st.integers(1, 3)),
        n_q=n_q,
        n_k=n_k,
        value_dim=draw(st.sampled_from((1, 3, 8))),
        seed=draw(st.integers(0, 2**31 - 1)),
        mask_kind=recipe,
    )


def _run_property(test: Callable[[Case], None], strategy: st.SearchStrategy[Case], max_examples: int) -> None:
    settings(max_examples=max_examples, deadline=None, derandomize=True,
             suppress_health_check=list(HealthCheck))(given(strategy)(test))()


def _forward_and_grads(backend: AttentionBackend, case: Case, bank: SplatBank, dtype=torch.float32):
    q, k, v = (t.requires_grad_() for t in case.tensors(bank, dtype))
    bank.zero_grad(set_to_none=True)
    out, _ = backend.forward(q, k, v, bank, case.mask())
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed), dtype=out.dtype)
    (out * weight).sum().backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    grads |= {f"bank.{n}": p.grad for n, p in bank.slot_parameters().items()}
    return out.detach(), grads


# ----------------------------------------------------------------------------- the checks
def check_matches_reference(backend: AttentionBackend, *, max_examples: int = 30,
                            reference: AttentionBackend | None = None, tol: float = REL_RMSE_TOL) -> None:
    """Outputs and every gradient agree with ``dense`` to relative RMSE ``tol``."""
    reference = reference or reference_backend()

    def test(case: Case) -> None:
        bank = case.bank.make()
        out, grads = _forward_and_grads(backend, case, bank)
        ref_out, ref_grads = _forward_and_grads(reference, case, bank)
        err = relative_rmse(out, ref_out)
        assert err <= tol, f"{backend.name} output differs from reference by rel RMSE {err:.2e} on {case}"
        # A gradient far below the largest one is compared against that scale (GRAD_FLOOR of it).
        scale = max((g.double().square().mean().sqrt().item() for g in ref_grads.values() if g is not None),
                    default=0.0)
        for name, ref_g in ref_grads.items():
            got = grads[name]
            if ref_g is None:
                continue
            assert got is not None, f"{backend.name} gives no gradient for {name} on {case}"
            err = relative_rmse(got, ref_g, floor=GRAD_FLOOR * scale)
            assert err <= tol, f"{backend.name} gradient of {name} differs by rel RMSE {err:.2e} on {case}"

    _run_property(test, cases(recipes_for(backend)), max_examples)


def check_causal(backend: AttentionBackend, *, max_examples: int = 20) -> None:
    """Changing token ``j`` never changes outputs ``i < j``."""
    if "causal" not in backend.supported_masks:
        return

    def test(case: Case) -> None:
        bank = case.bank.make()
        q, k, v = case.tensors(bank)
        mask = MaskSpec(causal=True)
        out, _ = backend.forward(q, k, v, bank, mask)
        j = case.seed % case.n_k
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        g = torch.Generator().manual_seed(case.seed + 7)
        q2[..., j:, :] += torch.randn(q2[..., j:, :].shape, generator=g) * 3
        k2[..., j:, :] += torch.randn(k2[..., j:, :].shape, generator=g) * 3
        v2[..., j:, :] += torch.randn(v2[..., j:, :].shape, generator=g) * 3
        out2, _ = backend.forward(q2, k2, v2, bank, mask)
        assert torch.equal(out[..., :j, :], out2[..., :j, :]) or torch.allclose(
            out[..., :j, :], out2[..., :j, :], rtol=0, atol=1e-6
        ), f"{backend.name}: outputs before position {j} changed when later tokens changed ({case})"

    _run_property(test, cases(["causal"]), max_examples)


def check_padding(backend: AttentionBackend, *, max_examples: int = 20) -> None:
    """Padded keys change nothing; padded queries give zeros."""
    kinds = backend.supported_masks
    if "key_padding" not in kinds:
        return
    recipes = [r for r in ("causal+padding", "bidirectional+padding", "cross") if MASK_RECIPES[r] <= kinds]

    def test(case: Case) -> None:
        bank = case.bank.make()
        q, k, v = case.tensors(bank)
        mask = case.mask()
        out, _ = backend.forward(q, k, v, bank, mask)
        pad_k = ~mask.key_padding
        g = torch.Generator().manual_seed(case.seed + 11)
        k2 = torch.where(pad_k[:, None, :, None], torch.randn(k.shape, generator=g) * 5, k)
        v2 = torch.where(pad_k[:, None, :, None], torch.randn(v.shape, generator=g) * 5, v)
        out2, _ = backend.forward(q, k2, v2, bank, mask)
        assert torch.allclose(out, out2, rtol=1e-5, atol=1e-6), (
            f"{backend.name}: changing padded keys/values changed the output ({case})"
        )
        if mask.query_padding is not None:
            padded_rows = out[~mask.query_padding[:, None, :].expand(-1, out.shape[1], -1)]
            assert torch.all(padded_rows == 0), f"{backend.name}: padded queries must give zeros ({case})"

    _run_property(test, cases(recipes), max_examples)


def check_permutation_equivariance(backend: AttentionBackend, *, max_examples: int = 20) -> None:
    """Without a causal mask, permuting keys/values changes nothing; permuting queries permutes outputs."""

    def test(case: Case) -> None:
        bank = case.bank.make()
        q, k, v = case.tensors(bank)
        mask = MaskSpec()
        out, _ = backend.forward(q, k, v, bank, mask)
        g = torch.Generator().manual_seed(case.seed)
        pk, pq = torch.randperm(case.n_k, generator=g), torch.randperm(case.n_q, generator=g)
        out2, _ = backend.forward(q[..., pq, :], k[..., pk, :], v[..., pk, :], bank, mask)
        assert torch.allclose(out[..., pq, :], out2, rtol=1e-4, atol=1e-5), (
            f"{backend.name}: not permutation-equivariant without a causal mask ({case})"
        )

    if "bidirectional" in recipes_for(backend):
        _run_property(test, cases(["bidirectional"]), max_examples)


def check_prefill_then_step(backend: RecurrentBackend, *, max_examples: int = 15, tol: float = REL_RMSE_TOL) -> None:
    """``prefill(n)`` then ``step`` ``m`` times equals one causal forward over ``n + m`` tokens."""

    def test(case: Case) -> None:
        bank = case.bank.make()
        q, k, v = case.tensors(bank)
        n_total = case.n_k
        n_prefill = case.seed % n_total
        key_padding = padding_mask(case.batch, n_total, case.seed, side="left")
        full, _ = backend.forward(q, k, v, bank, MaskSpec(causal=True, key_padding=key_padding))
        prefix_mask = MaskSpec(causal=True, key_padding=key_padding[:, :n_prefill])
        if n_prefill > 0:
            out_p, state = backend.prefill(q[..., :n_prefill, :], k[..., :n_prefill, :], v[..., :n_prefill, :],
                                           bank, prefix_mask)
        else:
            out_p, state = q.new_zeros(*q.shape[:2], 0, v.shape[-1]), backend.init_state(
                bank, case.batch, case.value_dim, q.device)
        outs = [out_p]
        for t in range(n_prefill, n_total):
            sl = slice(t, t + 1)
            o, state = backend.step(q[..., sl, :], k[..., sl, :], v[..., sl, :], bank, state,
                                    key_padding=key_padding[:, sl])
            outs.append(o)
        stepped = torch.cat(outs, dim=-2)
        real = key_padding[:, None, :, None].expand_as(full)  # rows of padded queries are undefined
        err = relative_rmse(stepped[real], full[real])
        assert err <= tol, f"{backend.name}: prefill+step differs from forward by rel RMSE {err:.2e} ({case})"

    _run_property(test, cases(["causal"]), max_examples)


def check_extreme_inputs(backend: AttentionBackend, *, max_examples: int = 15) -> None:
    """Finite outputs and gradients for huge norms, tiny/huge scales and a single alive splat."""
    recipes = recipes_for(backend)

    def test(case: Case, input_scale: float, log_scale: float, single: bool) -> None:
        spec = BankSpec(**{**case.bank.__dict__, "log_scale_range": (log_scale, log_scale),
                           "center_scale": input_scale})
        bank = spec.make()
        if single:
            with torch.no_grad():
                bank.alive.zero_()
                bank.alive[:, 0] = True
        q, k, v = (t.requires_grad_() for t in case.tensors(bank, scale=input_scale))
        out, _ = backend.forward(q, k, v, bank, case.mask())
        assert torch.isfinite(out).all(), f"{backend.name}: non-finite output (scale {input_scale}, {case})"
        out.square().sum().backward()
        for name, t in ({"q": q, "k": k, "v": v} | bank.slot_parameters()).items():
            if t.grad is not None:
                assert torch.isfinite(t.grad).all(), f"{backend.name}: non-finite gradient of {name} ({case})"

    strategy = st.tuples(
        cases(recipes),
        st.sampled_from((1e-3, 1.0, 1e2, 1e4)),
        st.sampled_from((math.log(1e-4), 0.0, math.log(1e4))),
        st.booleans(),
    )
    settings(max_examples=max_examples, deadline=None, derandomize=True,
             suppress_health_check=list(HealthCheck))(given(strategy)(lambda args: test(*args)))()


def check_gradcheck(backend: AttentionBackend, *, max_examples: int = 4) -> None:
    """``torch.autograd.gradcheck`` in float64 on small sizes, w.r.t. inputs and bank parameters."""

    def test(case: Case) -> None:
        bank = case.bank.make().double()
        q, k, v = (t.requires_grad_() for t in case.tensors(bank, torch.float64))
        mask = case.mask()
        params = list(bank.slot_parameters().values())

        def fn(q: Tensor, k: Tensor, v: Tensor, *ps: Tensor) -> Tensor:
            return backend.forward(q, k, v, bank, mask)[0]

        assert torch.autograd.gradcheck(fn, (q, k, v, *params), eps=1e-6, atol=1e-5, rtol=1e-4)

    _run_property(test, cases(recipes_for(backend), max_len=6, max_heads=2, head_dims=(2, 3),
                              max_capacity=4, allow_dead=False), max_examples)


def check_backend(backend: AttentionBackend, *, max_examples: int = 20) -> None:
    """Every backend invariant that applies to ``backend``: the one-line conformance test."""
    assert isinstance(backend, AttentionBackend), f"{backend!r} does not implement AttentionBackend"
    assert backend.supported_masks, f"{backend.name}: supported_masks is empty"
    check_matches_reference(backend, max_examples=max_examples)
    check_causal(backend, max_examples=max_examples)
    check_padding(backend, max_examples=max_examples)
    check_permutation_equivariance(backend, max_examples=max_examples)
    check_extreme_inputs(backend, max_examples=max_examples)
    check_gradcheck(backend)
    if isinstance(backend, RecurrentBackend):
        check_prefill_then_step(backend, max_examples=max_examples)
