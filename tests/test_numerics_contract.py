"""One NaN/Inf behaviour and empty sequences in every backend, hybrid attention and a converted model (issue 12)."""

from __future__ import annotations

import pytest
import torch
from _adapter_models import batch, gsa_config, tiny_gpt_neo

from gsa_core.errors import GSAError, NonFiniteInputError
from gsa_core.masks import MaskSpec
from gsa_core.numerics import check_finite
from gsa_core.registry import get_registry
from gsa_core.testing import check_empty_sequences, check_non_finite_inputs
from gsa_core.testing.strategies import BankSpec, random_qkv
from gsa_plugins.adapters import convert
from gsa_plugins.adapters.layers import hybrid_attention

BUILT_IN = ["auto", "dense", "kernel", "sparse"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_backend_refuses_non_finite_inputs(name):
    check_non_finite_inputs(get_registry().build("backend", name), max_examples=8)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_backend_accepts_empty_sequences(name):
    check_empty_sequences(get_registry().build("backend", name))


def test_the_error_names_the_tensor_and_where():
    bank = BankSpec(2, 4, 6, "diagonal", seed=0).make()
    q, k, v = random_qkv(bank, 2, 5, 5, 3, seed=0)
    k[1, 0, 3, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"'k' at batch row 1, head 0, position 3") as info:
        get_registry().build("backend", "kernel").forward(q, k, v, bank, MaskSpec(causal=True))
    assert isinstance(info.value, GSAError) and info.value.index == (1, 0, 3, 2)
    named = info.value.at_layer("transformer.h.0.attn.attention")
    assert "in transformer.h.0.attn.attention" in str(named) and named.at_layer("other") is named


def test_a_nan_key_no_longer_reaches_earlier_queries():
    """Before: kernel returned NaN for queries the causal mask hides the NaN key from. Now nothing is returned."""
    bank = BankSpec(1, 4, 6, "diagonal", seed=1).make()
    q, k, v = random_qkv(bank, 1, 8, 8, 3, seed=1)
    k[0, 0, 6, 0] = float("nan")
    for name in BUILT_IN:
        with pytest.raises(NonFiniteInputError):
            get_registry().build("backend", name).forward(q, k, v, bank, MaskSpec(causal=True))


def test_hybrid_attention_follows_the_contract():
    bank = BankSpec(2, 4, 6, "diagonal", seed=2).make()
    q, k, v = random_qkv(bank, 1, 6, 6, 3, seed=2)
    v[0, 1, 2, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match="'v'"):
        hybrid_attention(q, k, v, bank, MaskSpec(causal=True), scaling=1.0, window=2)
    for n_q, n_k, mask in ((0, 0, MaskSpec(causal=True)), (3, 0, MaskSpec(causal=True)), (0, 4, MaskSpec(causal=True))):
        q, k, v = random_qkv(bank, 1, n_q, n_k, 3, seed=2)
        out = hybrid_attention(q, k, v, bank, mask, scaling=1.0, window=2)
        assert out.shape == (1, 2, n_q, 3) and torch.all(out == 0)


def test_check_finite_fast_and_slow_paths_agree():
    small = torch.zeros(3, 4)
    big = torch.zeros(300, 300)  # above the one-concatenation threshold
    check_finite(a=small, b=big, c=None)
    for t in (small, big):
        t.view(-1)[-1] = float("-inf")
        with pytest.raises(NonFiniteInputError, match="-inf"):
            check_finite(a=small, b=big)
        t.view(-1)[-1] = 0.0


@pytest.mark.parametrize("layer", [0, 1])
def test_a_converted_model_names_the_layer(layer):
    """A NaN in the queries of one layer (its q_proj) stops the forward, and generation, with the layer's name
    (layer 0: GSA through the kernel backend; layer 1: hybrid)."""
    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", backend="kernel", local_layers="hybrid"))
    with torch.no_grad():
        model.transformer.h[layer].attn.attention.q_proj.weight[0, 0] = float("nan")
    ids, mask = batch(n=6, left_pad=0)
    where = rf"'q' in transformer\.h\.{layer}\.attn\.attention"
    with pytest.raises(NonFiniteInputError, match=where):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    with pytest.raises(NonFiniteInputError, match=where):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
