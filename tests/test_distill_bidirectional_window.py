"""Bidirectional hybrid attention: an exact symmetric window ``|i - j| <= w`` plus GSA beyond it, one softmax.

Checked against a naive per-pair reference, and on a converted BERT: a window covering the whole sequence
is the original attention; a window of 0 is GSA everywhere except the diagonal.
"""

from __future__ import annotations

import math

import pytest
import torch
from _adapter_models import batch, gsa_config, logits, tiny_bert
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.bank import SplatBank
from gsa_core.masks import MaskSpec
from gsa_plugins.adapters import convert, gsa_layers
from gsa_plugins.adapters.layers import GSALayer, hybrid_attention


@torch.no_grad()
def naive(q, k, v, bank, key_padding, scaling, window):
    """Per query and key, by the definition (float64 loops)."""
    b, h, n, _ = q.shape
    s = math.sqrt(scaling)
    lq, lk = bank.log_features(q * s), bank.log_features(k * s)  # [B, H, n, K]
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                scores = []
                for j in range(n):
                    if key_padding is not None and not bool(key_padding[bi, j]):
                        scores.append(-math.inf)
                    elif abs(i - j) <= window:
                        scores.append(float(q[bi, hi, i] @ k[bi, hi, j]) * scaling)
                    else:
                        scores.append(float(torch.logsumexp(lq[bi, hi, i] + lk[bi, hi, j], 0)))
                w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[bi, hi, i] = w @ v[bi, hi].double()
    return out


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 7), window=st.integers(0, 8), seed=st.integers(0, 1000), pad=st.integers(0, 3))
def test_bidirectional_hybrid_matches_naive_reference(n: int, window: int, seed: int, pad: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bank = SplatBank(2, 3, 4).double()
    with torch.no_grad():
        bank.centers.copy_(torch.randn(2, 4, 3, generator=g, dtype=torch.float64))
        bank.log_amplitude.copy_(torch.randn(2, 4, generator=g, dtype=torch.float64))
    q, k = (torch.randn(2, 2, n, 3, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, n, 2, generator=g, dtype=torch.float64)
    key_padding = torch.ones(2, n, dtype=torch.bool)
    n_pad = min(pad, n - 1)  # right padding, keep one real key
    if n_pad:
        key_padding[0, n - n_pad:] = False
    out = hybrid_attention(q, k, v, bank, MaskSpec(key_padding=key_padding), scaling=0.7, window=window)
    torch.testing.assert_close(out, naive(q, k, v, bank, key_padding, 0.7, window), atol=1e-9, rtol=1e-9)


def test_bidirectional_hybrid_rejects_cross_attention_and_bad_windows() -> None:
    bank = SplatBank(1, 2, 2)
    q, k = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 5, 2)
    with pytest.raises(ValueError, match="self-attention"):
        hybrid_attention(q, k, k, bank, MaskSpec(), scaling=1.0, window=2)
    with pytest.raises(ValueError, match="positive"):
        hybrid_attention(q, q, q, bank, MaskSpec(causal=True), scaling=1.0, window=0)
    with pytest.raises(ValueError, match="hybrid_window"):
        GSALayer(1, 2, __import__("gsa_core").GSAConfig(), mode="hybrid", causal=False)


def test_bert_hybrid_window_covering_everything_is_the_original() -> None:
    ids, mask = batch(left_pad=0)
    mask[0, -3:] = 0  # right padding, as BERT tokenizers pad
    original = logits(tiny_bert(), ids, mask)
    model = convert(tiny_bert(), gsa_config("bert", backend="dense", self_attention="hybrid", hybrid_window=64))
    assert all(layer.mode == "hybrid" and not layer.causal for layer in gsa_layers(model).values())
    real = mask.bool()
    torch.testing.assert_close(logits(model, ids, mask)[real], original[real], atol=1e-5, rtol=1e-4)


def test_bert_hybrid_small_window_differs_and_uses_gsa() -> None:
    ids, mask = batch(left_pad=0)
    original = logits(tiny_bert(), ids, mask)
    hybrid = logits(convert(tiny_bert(), gsa_config("bert", self_attention="hybrid", hybrid_window=1)), ids, mask)
    gsa = logits(convert(tiny_bert(), gsa_config("bert")), ids, mask)
    assert not torch.equal(hybrid, original) and not torch.equal(hybrid, gsa)


def test_the_adaptation_controller_observes_hybrid_layers() -> None:
    from gsa_core.adaptation import AdaptationController

    cfg = __import__("gsa_core").GSAConfig.from_dict({"bank": {"n_splats": 4}, "adaptation": {"enabled": True}})
    layer = GSALayer(2, 4, cfg, mode="hybrid", causal=False, hybrid_window=1, scaling=0.25)
    controller = AdaptationController(layer, cfg)
    layer.train()
    q = torch.randn(1, 2, 5, 4)
    out = layer.attend(q, q, q, MaskSpec())
    (observed,) = controller.banks[0].stats.pending
    torch.testing.assert_close(observed.q, q * 0.5)  # GSA space: q * sqrt(scaling)
    torch.testing.assert_close(out, hybrid_attention(q, q, q, layer.bank, MaskSpec(), scaling=0.25, window=1))
