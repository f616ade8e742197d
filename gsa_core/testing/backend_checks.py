"""Property checks every :class:`~gsa_core.protocols.AttentionBackend` must pass (DESIGN.md section 2).

``check_backend(MyBackend())`` runs all of them that apply to the backend's ``supported_masks``
(and the recurrent ones, :func:`check_recurrent`, when it implements
:class:`~gsa_core.protocols.RecurrentBackend`). Each check draws its cases with hypothesis; failures
name the case. The yardstick is the float64 naive reference (``gsa_core.reference``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.errors import NonFiniteInputError
from gsa_core.masks import MaskSpec
from gsa_core.protocols import AttentionBackend, RecurrentBackend
from gsa_core.recurrent import split_state, stack_states
from gsa_core.reference import ReferenceBackend
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
    """The float64 naive reference every backend is held to."""
    return ReferenceBackend()


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


def _settings(max_examples: int) -> settings:
    """Reproducible runs; no shrinking: the failing case is reported as drawn (shrinking a slow backend's
    failure can take longer than the whole check)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))


def _run_property(test: Callable[[Case], None], strategy: st.SearchStrategy[Case], max_examples: int) -> None:
    _settings(max_examples)(given(strategy)(test))()


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
    _settings(max_examples)(given(strategy)(lambda args: test(*args)))()


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


# ----------------------------------------------------------------------------- numerics contract
def _poisoned(t: Tensor, seed: int, value: float) -> Tensor:
    """``t`` with ``value`` (NaN or +-Inf) written at one position chosen by ``seed``."""
    out = t.detach().clone()
    out.view(-1)[seed % out.numel()] = value
    return out


def check_non_finite_inputs(backend: AttentionBackend, *, max_examples: int = 10) -> None:
    """A NaN or Inf in ``q``, ``k`` or ``v`` raises :class:`NonFiniteInputError` (in ``forward``, and in
    ``extend``, ``absorb`` and ``readout`` of a recurrent backend), never a NaN or changed output."""
    recipes = recipes_for(backend)
    recurrent = isinstance(backend, RecurrentBackend)

    def expect_error(what: str, case: Case, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except NonFiniteInputError:
            return
        raise AssertionError(f"{backend.name}: a non-finite {what} did not raise NonFiniteInputError ({case})")

    def test(case: Case, which: int, value: float) -> None:
        bank = case.bank.make()
        tensors = list(case.tensors(bank))
        name = "qkv"[which]
        tensors[which] = _poisoned(tensors[which], case.seed, value)
        q, k, v = tensors
        expect_error(f"{name} in forward", case, lambda: backend.forward(q, k, v, bank, case.mask()))
        if not recurrent:
            return
        assert isinstance(backend, RecurrentBackend)
        n = min(case.n_q, case.n_k)
        state = backend.init_state(bank, case.batch, case.value_dim, q.device)
        qa, ka, va = q[..., :n, :], k[..., :n, :], v[..., :n, :]
        poisoned_here = bool((~torch.isfinite(torch.cat([t.reshape(-1) for t in (qa, ka, va)]))).any())
        if poisoned_here:
            expect_error(f"{name} in extend", case,
                         lambda: backend.extend(qa, ka, va, bank, state, MaskSpec(causal=True)))
        if name != "q":
            expect_error(f"{name} in absorb", case, lambda: backend.absorb(k, v, bank, state))
        else:
            expect_error("q in readout", case, lambda: backend.readout(q, bank, state))

    strategy = st.tuples(cases(recipes, max_len=12), st.integers(0, 2),
                         st.sampled_from((float("nan"), float("inf"), float("-inf"))))
    _settings(max_examples)(given(strategy)(lambda args: test(*args)))()


def check_empty_sequences(backend: AttentionBackend) -> None:
    """Empty sequences are valid: ``n_q = 0``, ``n_k = 0`` or both give ``[B, H, n_q, d_v]`` zeros in ``v``'s
    dtype, for each mask the backend serves; ``extend`` of 0 tokens and ``absorb`` of 0 keys change nothing."""
    bank = BankSpec(2, 4, 5, "diagonal", seed=3).make()
    kinds = backend.supported_masks
    shapes: list[tuple[int, int, MaskSpec]] = [(0, 0, MaskSpec())]
    if "causal" in kinds:
        shapes += [(0, 0, MaskSpec(causal=True)), (0, 4, MaskSpec(causal=True)), (3, 0, MaskSpec(causal=True))]
    if "cross" in kinds:
        shapes += [(0, 4, MaskSpec()), (3, 0, MaskSpec())]
    if "key_padding" in kinds and "causal" in kinds:
        shapes.append((3, 0, MaskSpec(causal=True, key_padding=torch.zeros(2, 0, dtype=torch.bool))))
    for n_q, n_k, mask in shapes:
        q, k, v = random_qkv(bank, 2, n_q, n_k, 3, seed=n_q + 7 * n_k)
        out, _ = backend.forward(q, k, v, bank, mask)
        label = f"{backend.name}: n_q={n_q}, n_k={n_k}, {mask.kinds(n_q, n_k) or 'no mask'}"
        assert tuple(out.shape) == (2, 2, n_q, 3), f"{label}: output shape {tuple(out.shape)}"
        assert out.dtype == v.dtype, f"{label}: output dtype {out.dtype}, values {v.dtype}"
        if n_k == 0:
            assert torch.all(out == 0), f"{label}: queries that see no key must give zeros"
    if isinstance(backend, RecurrentBackend):
        q, k, v = random_qkv(bank, 2, 4, 4, 3, seed=1)
        _, state = backend.extend(q, k, v, bank, backend.init_state(bank, 2, 3, q.device), MaskSpec(causal=True))
        before = backend.readout(q, bank, state)
        out, same = backend.extend(q[..., :0, :], k[..., :0, :], v[..., :0, :], bank, state, MaskSpec(causal=True))
        assert tuple(out.shape) == (2, 2, 0, 3), f"{backend.name}: extend of 0 tokens gave {tuple(out.shape)}"
        for label, st_ in (("extend of 0 tokens", same), ("absorb of 0 keys",
                                                          backend.absorb(k[..., :0, :], v[..., :0, :], bank, state))):
            after = backend.readout(q, bank, st_)
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (
                f"{backend.name}: {label} changed the state")


# ----------------------------------------------------------------------------- recurrent contract
def _real_rows(out: Tensor, query_padding: Tensor | None) -> Tensor:
    return out if query_padding is None else out[query_padding[:, None, :].expand(-1, out.shape[1], -1)]


def _readout_error(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    """Relative RMSE of two readouts' outputs, or inf when they disagree on which rows see a key."""
    if not torch.equal(torch.isfinite(a[1]), torch.isfinite(b[1])):
        return float("inf")
    return relative_rmse(a[0], b[0])


def _merge_readouts(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Readouts of disjoint key sets under one normaliser: what the readout of their union must be."""
    (oa, la), (ob, lb) = a, b
    lse = torch.logaddexp(la, lb)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa, wb = torch.exp(la - ref).unsqueeze(-1), torch.exp(lb - ref).unsqueeze(-1)
    return wa * oa + wb * ob, lse


def _pieces(cuts: list[int], n: int) -> list[slice]:
    bounds = [0, *sorted(min(c, n) for c in cuts), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def check_extend_splits(backend: RecurrentBackend, *, max_examples: int = 15, tol: float = REL_RMSE_TOL) -> None:
    """``extend`` over any split of a sequence (empty pieces included, padded tokens anywhere) equals one
    causal ``forward``, and leaves the state one ``absorb`` of every key would give."""

    def test(case: Case, cuts: list[int], side: str) -> None:
        bank = case.bank.make()
        q, k, v = case.tensors(bank)
        n = case.n_k
        pad = padding_mask(case.batch, n, case.seed, side=side, min_real=0)
        full, _ = backend.forward(q, k, v, bank, MaskSpec(causal=True, key_padding=pad, query_padding=pad))
        state = backend.init_state(bank, case.batch, case.value_dim, q.device)
        outs = []
        for sl in _pieces(cuts, n):
            piece = MaskSpec(causal=True, key_padding=pad[:, sl], query_padding=pad[:, sl])
            out, state = backend.extend(q[..., sl, :], k[..., sl, :], v[..., sl, :], bank, state, piece)
            outs.append(out)
        got = torch.cat(outs, dim=-2)
        err = relative_rmse(got, full)
        assert err <= tol, f"{backend.name}: extend over pieces {cuts} differs from forward by {err:.2e} ({case})"
        assert torch.all(_real_rows(got, ~pad) == 0), f"{backend.name}: padded queries must give zeros ({case})"
        whole = backend.absorb(k, v, bank, backend.init_state(bank, case.batch, case.value_dim, q.device), pad)
        err = _readout_error(backend.readout(q, bank, state), backend.readout(q, bank, whole))
        assert err <= tol, (f"{backend.name}: the state after extend differs from absorbing every key "
                            f"({err:.2e}, {case})")

    strategy = st.tuples(cases(["causal"], max_len=30), st.lists(st.integers(0, 30), max_size=4),
                         st.sampled_from(("left", "right")))
    _settings(max_examples)(given(strategy)(lambda args: test(*args)))()


def check_absorb_readout(backend: RecurrentBackend, *, max_examples: int = 15, tol: float = REL_RMSE_TOL) -> None:
    """``absorb`` then ``readout`` equals attending to those keys (padding respected); readouts of two
    states merge into the readout of their union (so ``lse`` is the log of the total weight); absorbing
    in two calls equals one; the given state is never modified."""

    def test(case: Case) -> None:
        bank = case.bank.make()
        q, k, v = case.tensors(bank)
        n_k = case.n_k
        pad = padding_mask(case.batch, n_k, case.seed, min_real=0)
        empty = backend.init_state(bank, case.batch, case.value_dim, q.device)
        state = backend.absorb(k, v, bank, empty, pad)
        got = backend.readout(q, bank, state)
        ref, _ = backend.forward(q, k, v, bank, MaskSpec(causal=True, key_padding=pad, query_offset=n_k))
        err = relative_rmse(got[0], ref)
        assert err <= tol, f"{backend.name}: absorb + readout differs from attending to the keys by {err:.2e} ({case})"
        unseen = ~torch.isfinite(got[1])
        assert torch.all(got[0][unseen] == 0), f"{backend.name}: a readout with lse = -inf must give zeros ({case})"
        cut = case.seed % (n_k + 1)
        first = backend.absorb(k[..., :cut, :], v[..., :cut, :], bank, empty, pad[:, :cut])
        second = backend.absorb(k[..., cut:, :], v[..., cut:, :], bank, empty, pad[:, cut:])
        merged = _merge_readouts(backend.readout(q, bank, first), backend.readout(q, bank, second))
        err = _readout_error(merged, got)
        assert err <= tol, (f"{backend.name}: readouts of two key sets do not merge into their union's "
                            f"({err:.2e}, {case})")
        # fp32 log-sum-exp of <= K terms, grouped differently: a few ulp of |lse| plus K·eps; 1e-4 is 10x that
        finite = torch.isfinite(got[1])
        gap = (merged[1][finite] - got[1][finite]).abs() / (1 + got[1][finite].abs())
        assert gap.numel() == 0 or gap.max().item() <= tol, (
            f"{backend.name}: lse of the union is off by {gap.max():.2e} ({case})")
        twice = backend.absorb(k[..., cut:, :], v[..., cut:, :], bank, first, pad[:, cut:])
        err = _readout_error(backend.readout(q, bank, twice), got)
        assert err <= tol, f"{backend.name}: absorbing in two calls differs from one ({err:.2e}, {case})"
        after = backend.readout(q, bank, empty)
        assert not bool(torch.isfinite(after[1]).any()) and torch.all(after[0] == 0), (
            f"{backend.name}: absorb modified the state it was given ({case})")

    _run_property(test, cases(["cross"], max_len=20), max_examples)


def check_state_batching(backend: RecurrentBackend, *, max_examples: int = 10, tol: float = REL_RMSE_TOL) -> None:
    """States of sequences of different lengths stack and split again (``split(stack(s)) == s``, sizes
    independent of length), and one ``extend`` of the stacked state, each sequence with its own number
    of new tokens (right padding), equals extending each sequence alone; ``extend`` never modifies its input."""

    def test(case: Case, lengths: list[int], new: list[int]) -> None:
        bank = case.bank.make()
        m = max(new)
        sessions = []
        for i, (n, t) in enumerate(zip(lengths, new, strict=True)):
            q, k, v = random_qkv(bank, 1, n + m, n + m, case.value_dim, case.seed + i)
            _, state = backend.extend(q[..., :n, :], k[..., :n, :], v[..., :n, :], bank,
                                      backend.init_state(bank, 1, case.value_dim, q.device), MaskSpec(causal=True))
            sessions.append((state, q[..., n:, :], k[..., n:, :], v[..., n:, :], t))
        probe = random_qkv(bank, len(lengths), 3, 0, 1, case.seed)[0]
        sizes = {s[0].nbytes() for s in sessions} | {backend.init_state(bank, 1, case.value_dim, probe.device).nbytes()}
        assert len(sizes) == 1, f"{backend.name}: state sizes depend on the length: {sorted(sizes)} ({case})"
        stacked = stack_states([s[0] for s in sessions])
        assert stacked.batch_size == len(sessions) and stacked.nbytes() == len(sessions) * sizes.pop()
        for i, (part, (state, *_)) in enumerate(zip(split_state(stacked), sessions, strict=True)):
            a = backend.readout(probe[i:i + 1], bank, part)
            b = backend.readout(probe[i:i + 1], bank, state)
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (
                f"{backend.name}: split(stack(states))[{i}] is not states[{i}] ({case})")
        real = torch.tensor([[j < t for j in range(m)] for *_, t in sessions])
        qs, ks, vs = (torch.cat([s[j] for s in sessions]) for j in (1, 2, 3))
        kept = backend.readout(probe, bank, stacked)
        out, batched = backend.extend(qs, ks, vs, bank, stacked, MaskSpec(causal=True, key_padding=real,
                                                                          query_padding=real))
        again = backend.readout(probe, bank, stacked)
        assert all(torch.equal(x, y) for x, y in zip(kept, again, strict=True)), (
            f"{backend.name}: extend modified the state it was given ({case})")
        for i, (part, (state, q, k, v, t)) in enumerate(zip(split_state(batched), sessions, strict=True)):
            alone, after = backend.extend(q[..., :t, :], k[..., :t, :], v[..., :t, :], bank, state,
                                          MaskSpec(causal=True))
            err = relative_rmse(out[i:i + 1, :, :t], alone) if t else 0.0
            assert err <= tol, f"{backend.name}: batched extend differs for sequence {i} by {err:.2e} ({case})"
            one = probe[i:i + 1]
            err = _readout_error(backend.readout(one, bank, part), backend.readout(one, bank, after))
            assert err <= tol, f"{backend.name}: batched extend left sequence {i} another state ({err:.2e}, {case})"

    strategy = st.integers(1, 3).flatmap(lambda b: st.tuples(
        cases(["causal"], max_len=4), st.lists(st.integers(0, 25), min_size=b, max_size=b),
        st.lists(st.integers(0, 4), min_size=b, max_size=b).filter(lambda t: max(t) > 0)))
    _settings(max_examples)(given(strategy)(lambda args: test(*args)))()


def check_recurrent(backend: RecurrentBackend, *, max_examples: int = 15) -> None:
    """Every invariant of the recurrent contract (:class:`~gsa_core.protocols.RecurrentBackend`)."""
    assert isinstance(backend, RecurrentBackend), f"{backend!r} does not implement RecurrentBackend"
    check_extend_splits(backend, max_examples=max_examples)
    check_absorb_readout(backend, max_examples=max_examples)
    check_state_batching(backend, max_examples=max(5, max_examples // 2))
    check_prefill_then_step(backend, max_examples=max_examples)


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
    check_non_finite_inputs(backend, max_examples=max(5, max_examples // 2))
    check_empty_sequences(backend)
    if isinstance(backend, RecurrentBackend):
        check_recurrent(backend, max_examples=max_examples)
