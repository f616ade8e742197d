"""The recall cache at the attention level: its definition, chunking, memory, config and why it helps."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.config import GSAConfig
from gsa_core.errors import ConfigError, MaskNotSupportedError, NonFiniteInputError, UnknownComponentError
from gsa_core.masks import MaskSpec
from gsa_core.recall import RecallSet
from gsa_core.registry import get_registry
from gsa_core.testing import BankSpec, check_recall_policy, reference_recall_attention
from gsa_plugins.adapters.layers import GSALayer
from gsa_plugins.adapters.past import LayerPast

POLICIES = get_registry().names("recall")
# float64 outputs of two summation orders (chunked state readouts vs a dense softmax): ~1e-15 each
TOL64 = 1e-10


def recall_layer(policy: str = "self-recall", *, budget: int = 3, block: int = 4, mode: str = "gsa",
                 window: int | None = None, splats: int = 6, heads: int = 2, dim: int = 4, seed: int = 0,
                 dtype: torch.dtype = torch.float64, scaling: float = 1.0, awaiting: str = "exact") -> GSALayer:
    cfg = GSAConfig.from_dict({"backend": "kernel", "bank": {"n_splats": splats},
                               "recall": {"name": policy,
                                          "params": {"budget": budget, "block": block, "awaiting": awaiting}}})
    torch.manual_seed(seed)
    layer = GSALayer(heads, dim, cfg, mode=mode, hybrid_window=window, layer=0, scaling=scaling)
    spec = BankSpec(n_heads=heads, head_dim=dim, capacity=splats, covariance="diagonal", seed=seed)
    layer.bank.load_state_dict(spec.make().state_dict())
    return layer.to(dtype)


def qkv(batch: int, heads: int, n: int, dim: int, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=g, dtype=dtype) for _ in range(3))


def decode_in_pieces(layer: GSALayer, q, k, v, valid, cuts: list[int], past: LayerPast | None = None):
    plan = layer.decode_plan()
    outs, bounds = [], [0, *sorted(set(cuts)), q.shape[-2]]
    for a, b in itertools.pairwise(bounds):
        out, past = layer.decode(plan, q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], valid[:, a:b], past)
        outs.append(out)
    return torch.cat(outs, dim=-2), past


# ----------------------------------------------------------------------------- the policies
@pytest.mark.parametrize("name", POLICIES)
def test_builtin_policies_pass_the_kit(name):
    check_recall_policy(get_registry().build("recall", name, {"budget": 4, "block": 2}))


RECENT = get_registry().get("recall", "recent").factory


class ByIndex(RECENT):
    def score(self, candidates):  # the candidate's slot, not the candidate: depends on the order
        return torch.arange(candidates.keys.shape[-2], dtype=torch.float64).expand(candidates.positions.shape)


class Ranked(RECENT):
    def score(self, candidates):  # a rank among all candidates: padding changes the others' scores
        return candidates.keys.sum(-1).argsort(-1).argsort(-1).double()


class Infinite(RECENT):
    def score(self, candidates):
        return torch.full(candidates.positions.shape, float("inf"))


@pytest.mark.parametrize("policy, message", [(ByIndex(), "depends on candidate order"),
                                             (Ranked(), "changed a valid score"), (Infinite(), "non-finite")])
def test_the_kit_catches_broken_policies(policy, message):
    with pytest.raises(AssertionError, match=message):
        check_recall_policy(policy)


def test_self_recall_scores_the_value_the_state_gives_back():
    from gsa_core.recall import RecallCandidates

    values = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    readout = (torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), torch.zeros(1, 1, 2))
    cands = RecallCandidates(torch.zeros(1, 1, 2, 3), values, torch.ones(1, 2, dtype=torch.bool),
                             torch.tensor([[[0, 1]]]), readout)
    scores = get_registry().build("recall", "self-recall").score(cands)
    assert scores.tolist() == [[[0.0, 4.0]]]  # reproduced exactly -> 0; missed -> |v|^2


# ----------------------------------------------------------------------------- the definition
@settings(max_examples=20, deadline=None)
@given(policy=st.sampled_from(POLICIES), budget=st.integers(1, 4), block=st.integers(1, 6),
       window=st.sampled_from([0, 1, 3, 6]), n=st.integers(0, 22), seed=st.integers(0, 2**16),
       pad=st.booleans(), awaiting=st.sampled_from(["exact", "gsa"]))
def test_forward_equals_the_naive_definition(policy, budget, block, window, n, seed, pad, awaiting):
    """Exact window + cached keys (+ awaiting keys when ``awaiting = "exact"``) by their exact logit, the rest by
    GSA weight, one softmax; selections every ``block`` tokens; no key counted twice (the reference keeps
    explicit sets of key indices)."""
    mode = "hybrid" if window else "gsa"
    layer = recall_layer(policy, budget=budget, block=block, mode=mode, window=window or None, seed=seed,
                         awaiting=awaiting)
    q, k, v = qkv(2, 2, n, 4, seed)
    valid = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) < (0.7 if pad else 1.0)
    out = layer(q, k, v, MaskSpec(causal=True, key_padding=valid))
    ref = reference_recall_attention(q, k, v, layer.bank, layer.recall, window=window, valid=valid)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)


def test_host_space_decoding_equals_the_gsa_space_definition():
    """``scaling`` (BERT's 1/sqrt(d)): the cached keys' exact logit is the host's ``scaling * q.k``."""
    layer = recall_layer(budget=2, block=3, mode="hybrid", window=2, scaling=0.25)
    q, k, v = qkv(1, 2, 14, 4, 3)
    valid = torch.ones(1, 14, dtype=torch.bool)
    out, _ = decode_in_pieces(layer, q, k, v, valid, [5])
    ref = reference_recall_attention(q * 0.5, k * 0.5, v, layer.bank, layer.recall, window=2)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)


@settings(max_examples=20, deadline=None)
@given(policy=st.sampled_from(POLICIES), window=st.sampled_from([0, 2, 5]), block=st.integers(1, 5),
       cuts=st.lists(st.integers(0, 27), max_size=4), seed=st.integers(0, 2**16),
       awaiting=st.sampled_from(["exact", "gsa"]))
def test_any_split_equals_one_forward(policy, window, block, cuts, seed, awaiting):
    """prefill(n) + decode(m) == forward(n + m), any chunking; the selections and the state are bit-identical."""
    layer = recall_layer(policy, budget=3, block=block, mode="hybrid" if window else "gsa", window=window or None,
                         seed=seed, dtype=torch.float32, awaiting=awaiting)
    q, k, v = qkv(2, 2, 27, 4, seed, torch.float32)
    valid = torch.ones(2, 27, dtype=torch.bool)
    valid[0, :4] = False  # a left-padded row
    full = layer(q, k, v, MaskSpec(causal=True, key_padding=valid))
    one, past_one = decode_in_pieces(layer, q, k, v, valid, [])
    got, past = decode_in_pieces(layer, q, k, v, valid, cuts)
    # fp32 attention of O(1) values summed in different block sizes: a few ulps
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(past.recall.tensors().values(), past_one.recall.tensors().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(past.state.tensors().values(), past_one.state.tensors().values(), strict=True):
        assert torch.equal(a, b)


def test_queries_after_keys_see_them_through_the_same_process():
    """A query offset (transformers' own cache hands all keys and the new queries) gives the last rows."""
    layer = recall_layer(budget=2, block=3)
    q, k, v = qkv(1, 2, 17, 4, 5)
    full = layer(q, k, v, MaskSpec(causal=True))
    tail = layer(q[..., 11:, :], k, v, MaskSpec(causal=True))
    torch.testing.assert_close(tail, full[..., 11:, :], rtol=0, atol=TOL64)


def test_stacked_rows_of_different_lengths_decode_like_each_alone():
    """Sessions at different points of their selection cycle, one batched step (continuous batching)."""
    layer = recall_layer(budget=2, block=4, mode="hybrid", window=3, dtype=torch.float32)
    pasts, steps = [], []
    for n, seed in ((9, 1), (14, 2), (3, 3)):
        q, k, v = qkv(1, 2, n + 5, 4, seed, torch.float32)
        _, past = decode_in_pieces(layer, q[..., :n, :], k[..., :n, :], v[..., :n, :],
                                   torch.ones(1, n, dtype=torch.bool), [])
        pasts.append(past)
        steps.append((q[..., n:, :], k[..., n:, :], v[..., n:, :]))
    stacked = LayerPast.stack(pasts)
    q, k, v = (torch.cat(t, dim=0) for t in zip(*steps, strict=True))
    out, _ = decode_in_pieces(layer, q, k, v, torch.ones(3, 5, dtype=torch.bool), [1, 2, 3, 4], stacked)
    for i, (past, (qi, ki, vi)) in enumerate(zip(pasts, steps, strict=True)):
        alone, _ = decode_in_pieces(layer, qi, ki, vi, torch.ones(1, 5, dtype=torch.bool), [1, 2, 3, 4], past)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-6)  # fp32, other block sizes


def test_memory_is_bounded_whatever_the_length():
    budget, block, window = 4, 8, 5
    layer = recall_layer(budget=budget, block=block, mode="hybrid", window=window, dtype=torch.float32)
    q, k, v = qkv(1, 2, 300, 4, 0, torch.float32)
    plan, past, sizes = layer.decode_plan(), None, []
    for t in range(300):
        _, past = layer.decode(plan, q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :],
                               torch.ones(1, 1, dtype=torch.bool), past)
        assert past.keys.shape[-2] <= window - 1 + block and past.recall.budget == budget
        sizes.append(past.nbytes())
    assert plan.kind == "recall" and max(sizes[100:]) == max(sizes[:100])  # a cycle of block tokens, no growth
    assert int(past.recall.valid.sum()) == budget and int(past.recall.seen) == 300


def test_every_key_is_cached_kept_or_absorbed_exactly_once():
    """Counted through the state: absorbing the cached and kept keys into it gives the state of every key."""
    layer = recall_layer(budget=3, block=4, mode="hybrid", window=3)
    q, k, v = qkv(1, 2, 23, 4, 7)
    _, past = decode_in_pieces(layer, q, k, v, torch.ones(1, 23, dtype=torch.bool), [6, 13])
    backend, bank = layer.recurrent_backend(), layer.bank
    state = backend.absorb(past.recall.keys, past.recall.values, bank, past.state, past.recall.valid)
    state = backend.absorb(past.keys, past.values, bank, state, past.valid)
    every = backend.absorb(k, v, bank, backend.init_state(bank, 1, 4, k.device))
    torch.testing.assert_close(state.z, every.z, rtol=0, atol=TOL64)
    torch.testing.assert_close(state.M, every.M, rtol=0, atol=TOL64)


# ----------------------------------------------------------------------------- why it helps
def test_the_cache_recalls_a_key_the_state_cannot():
    """One alive splat: the state is rank 1, so every query reads the same average of values and cannot find a
    single key. Self-recall keeps that key exact (its value is the one the average reproduces worst), and the
    query that matches it gets its value back."""
    n, heads, dim, needle = 64, 1, 4, 17
    k = torch.zeros(1, heads, n, dim, dtype=torch.float64)
    k[..., :, 0] = 1.0  # the haystack: one key, repeated
    k[..., needle, :] = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    v = torch.zeros(1, heads, n, 2, dtype=torch.float64)
    v[..., :, 0] = 1.0
    v[..., needle, :] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    q = k.clone()
    q[..., -1, :] = k[..., needle, :]  # the last query asks for the needle
    results = {}
    for budget in (None, 2):
        cfg = {"backend": "kernel", "bank": {"n_splats": 1, "covariance": "isotropic"}}
        if budget:
            cfg["recall"] = {"name": "self-recall", "params": {"budget": budget, "block": 8}}
        layer = GSALayer(heads, dim, GSAConfig.from_dict(cfg), mode="gsa", layer=0).double()
        with torch.no_grad():  # one wide splat at the origin: haystack and needle keys weigh about the same
            layer.bank.centers.zero_()
            layer.bank.shape_params().fill_(2.0)
        out = layer(q, k, v, MaskSpec(causal=True))
        results[budget] = float(out.detach()[0, 0, -1, 1])  # the needle's coordinate in the last output
    assert results[None] < 2.0 / n  # the rank-1 state: about the needle's share of the keys (1/64)
    assert results[2] > 0.99  # exact logit 9 for the needle vs 0 for the haystack keys: e^9/(e^9 + 63)


def test_exact_awaiting_keys_recall_a_needle_in_the_newest_block():
    """A needle after the last selection is not yet a candidate: with ``awaiting = "gsa"`` a gsa-mode layer (no
    window) scores it by the rank-1 state's weight like the haystack; ``"exact"`` scores it by its exact logit."""
    n, heads, dim, needle, block = 64, 1, 4, 60, 8  # the last selection was after token 55: 60 awaits
    k = torch.zeros(1, heads, n, dim, dtype=torch.float64)
    k[..., :, 0] = 1.0
    k[..., needle, :] = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    v = torch.zeros(1, heads, n, 2, dtype=torch.float64)
    v[..., :, 0] = 1.0
    v[..., needle, :] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    q = k.clone()
    q[..., -1, :] = k[..., needle, :]
    got = {}
    for awaiting in ("gsa", "exact"):
        cfg = {"backend": "kernel", "bank": {"n_splats": 1, "covariance": "isotropic"},
               "recall": {"name": "self-recall", "params": {"budget": 2, "block": block, "awaiting": awaiting}}}
        layer = GSALayer(heads, dim, GSAConfig.from_dict(cfg), mode="gsa", layer=0).double()
        with torch.no_grad():
            layer.bank.centers.zero_()
            layer.bank.shape_params().fill_(2.0)
        got[awaiting] = float(layer(q, k, v, MaskSpec(causal=True)).detach()[0, 0, -1, 1])
    assert got["gsa"] < 2.0 / n  # one wide splat: the needle weighs about as much as every other key (1/64)
    assert got["exact"] > 0.99  # exact logit 9 against about 0 for the 63 others: e^9 / (e^9 + 63) = 0.992


def test_gradients_flow_through_cached_keys_and_state():
    layer = recall_layer(budget=2, block=3, mode="hybrid", window=2, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 12, 4, 0, torch.float32))
    layer(q, k, v, MaskSpec(causal=True)).square().sum().backward()
    for t in (q, k, v, *layer.bank.parameters()):
        if t.requires_grad and t.grad is not None:
            assert torch.isfinite(t.grad).all()
    assert k.grad.abs().sum() > 0 and layer.bank.centers.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- errors
def test_unknown_policy_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"Did you mean 'self-recall'"):
        GSAConfig.from_dict({"recall": {"name": "self-recal"}})
    with pytest.raises(UnknownComponentError):
        get_registry().build("recall", "nope")


@pytest.mark.parametrize("recall, message", [
    ({"name": "recent", "params": {"budget": 0}}, "budget"),
    ({"name": "recent", "params": {"block": -1}}, "block"),
    ({"name": "recent", "params": {"bugdet": 3}}, "bugdet"),
    ({"name": "recent", "layers": [1, 1]}, "distinct"),
    ({"name": "recent", "layers": []}, "distinct"),
])
def test_bad_recall_settings_are_config_errors(recall, message):
    with pytest.raises(ConfigError, match=message):
        GSAConfig.from_dict({"recall": recall})


def test_a_backend_without_an_exact_state_is_refused():
    cfg = GSAConfig.from_dict({"backend": "dense", "recall": "self-recall"})
    with pytest.raises(ConfigError, match="recurrent backend"):
        GSALayer(2, 4, cfg, mode="gsa", layer=0)


def test_layers_that_cannot_keep_a_cache():
    cfg = GSAConfig.from_dict({"backend": "kernel", "recall": {"name": "recent", "layers": [0]}})
    with pytest.raises(ConfigError, match="cannot keep a recall cache"):
        GSALayer(2, 4, cfg, mode="gsa", window=8, layer=0)  # its own sliding window forgets by design
    assert GSALayer(2, 4, cfg, mode="gsa", layer=1).recall is None  # not named
    every = GSAConfig.from_dict({"backend": "kernel", "recall": "recent"})
    assert GSALayer(2, 4, every, mode="gsa", causal=False, layer=0).recall is None  # an encoder: none


def test_non_causal_masks_and_non_finite_inputs():
    layer = recall_layer()
    q, k, v = qkv(1, 2, 6, 4, 0)
    with pytest.raises(MaskNotSupportedError, match="recall cache"):
        layer(q, k, v, MaskSpec())
    layer.label = "layer.0"
    k[0, 1, 3, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"layer\.0"):
        layer(q, k, v, MaskSpec(causal=True))


def test_recall_sets_stack_and_split():
    a = RecallSet.empty(1, 2, 3, 4, 5, device=torch.device("cpu"), dtype=torch.float32)
    b = RecallSet.empty(2, 2, 3, 4, 5, device=torch.device("cpu"), dtype=torch.float32)
    both = RecallSet.stack([a, b])
    assert both.batch_size == 3 and both.nbytes() == a.nbytes() * 3 and len(both.split()) == 3
