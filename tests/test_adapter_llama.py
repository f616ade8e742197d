"""The llama adapter: a causal AttentionInterface family with rotary embeddings and grouped-query heads."""

from __future__ import annotations

import pytest
import torch
from _adapter_models import batch, greedy, gsa_config, logits, positions, tiny_llama

from gsa_core.config import GSAConfig
from gsa_core.registry import get_registry
from gsa_core.testing import check_adapter
from gsa_plugins.adapters import attention_layers, banks, convert, load_converted, set_passthrough


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_conformance_kit(attn):
    ids, mask = batch()
    check_adapter(get_registry().build("adapter", "llama"), lambda: tiny_llama(attn=attn),
                  GSAConfig.from_dict(gsa_config("llama", passthrough=True)), lambda m: logits(m, ids, mask))


def test_passthrough_generate_identical_and_cache():
    model = tiny_llama()
    ids, mask = batch(n=9, left_pad=3)
    ref = greedy(model, ids, mask, n=6)
    convert(model, gsa_config("llama", passthrough=True))
    assert torch.equal(greedy(model, ids, mask, n=6), ref)


@pytest.mark.parametrize(("backend", "mode"), [("dense", "gsa"), ("kernel", "gsa"), ("dense", "hybrid")])
def test_gsa_generate_batched_padded(backend, mode):
    model = tiny_llama()
    params = {"self_attention": mode, **({"hybrid_window": 4} if mode == "hybrid" else {})}
    convert(model, gsa_config("llama", backend=backend, **params))
    ids, mask = batch(n=9, left_pad=3)
    out = greedy(model, ids, mask, n=5)
    assert out.shape == (2, 14)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    full = logits(model, out, full_mask, position_ids=positions(full_mask))
    assert torch.equal(full[:, 8:-1].argmax(-1), out[:, 9:])
    # grouped-query attention: 2 key heads serve 4 query heads, the bank has one row per query head
    assert all(b.n_heads == 4 and b.head_dim == 8 for b in banks(model).values())


def test_round_trip_and_capture_points(tmp_path):
    from gsa_calibrate.collect import collect_qk

    model = tiny_llama()
    convert(model, gsa_config("llama"))
    set_passthrough(model, True)  # calibrate on the exact teacher activations
    layers = attention_layers(model)
    ids, mask = batch()
    vectors = collect_qk(model, layers, [{"input_ids": ids, "attention_mask": mask}])
    q, k = vectors["model.layers.0.self_attn"]
    assert q.shape == k.shape == (4, int(mask.sum()), 8)
    set_passthrough(model, False)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    assert (logits(again, ids, mask) - before).abs().max().item() == 0.0
