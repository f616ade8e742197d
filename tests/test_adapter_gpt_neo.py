"""The gpt-neo adapter: passthrough exactness, generation, GSA on (dense, kernel, hybrid), checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _adapter_models import batch, greedy, gsa_config, logits, positions, tiny_gpt_neo

from gsa_core.config import GSAConfig
from gsa_core.registry import get_registry
from gsa_core.testing import check_adapter
from gsa_plugins.adapters import (
    GSALayer,
    attention_layers,
    banks,
    convert,
    gsa_layers,
    is_converted,
    load_converted,
    set_passthrough,
)


def test_conformance_kit():
    ids, mask = batch()
    adapter = get_registry().build("adapter", "gpt-neo")
    check_adapter(adapter, tiny_gpt_neo, GSAConfig.from_dict(gsa_config("gpt-neo", passthrough=True)),
                  lambda m: logits(m, ids, mask))


def test_detected_and_structure_kept():
    model = tiny_gpt_neo()
    convert(model, {"bank": {"n_splats": 8}})  # adapter detected from the model
    assert is_converted(model) and model.config.model_type == "gsa_gpt_neo"
    attn = model.transformer.h[0].attn.attention
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    assert isinstance(attn, GPTNeoSelfAttention) and isinstance(attn.gsa, GSALayer)
    assert model.config.gsa["adapter"]["name"] == "gpt-neo"
    # defaults: global layers GSA, local layers exact (no bank)
    assert list(gsa_layers(model)) == ["transformer.h.0.attn.attention"]
    assert banks(model)["transformer.h.0.attn.attention"].capacity == 8


def test_passthrough_exact_with_left_padding_and_cache():
    model = tiny_gpt_neo()
    ids, mask = batch(n=12, left_pad=4)
    pos = positions(mask)
    ref = logits(model, ids, mask, position_ids=pos)
    with torch.no_grad():  # prefill 8 tokens then 4 with the cache
        first = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8], use_cache=True)
        ref_next = model(input_ids=ids[:, 8:], attention_mask=mask, position_ids=pos[:, 8:],
                         cache=first.cache).logits
    convert(model, gsa_config("gpt-neo", passthrough=True, local_layers="hybrid"))
    assert (logits(model, ids, mask, position_ids=pos) - ref).abs().max().item() == 0.0
    with torch.no_grad(), warnings.catch_warnings():  # the same through the older keyword, past_key_values
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it to cache
        first = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8], use_cache=True)
        nxt = model(input_ids=ids[:, 8:], attention_mask=mask, position_ids=pos[:, 8:],
                    past_key_values=first.cache).logits
    assert (nxt - ref_next).abs().max().item() == 0.0


def test_passthrough_greedy_generate_identical():
    model = tiny_gpt_neo()
    ids, mask = batch(n=9, left_pad=3)
    ref = greedy(model, ids, mask, n=8)
    convert(model, gsa_config("gpt-neo", passthrough=True, global_layers="gsa", local_layers="gsa"))
    assert torch.equal(greedy(model, ids, mask, n=8), ref)


@pytest.mark.parametrize(("backend", "local"), [("dense", "exact"), ("dense", "gsa"), ("kernel", "exact"),
                                                ("kernel", "hybrid"), ("auto", "hybrid")])
def test_gsa_generate_batched_padded(backend, local):
    """GSA on: generate runs end to end, and cached decoding agrees with one full forward."""
    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", backend=backend, local_layers=local))
    ids, mask = batch(n=9, left_pad=3)
    out = greedy(model, ids, mask, n=6)
    assert out.shape == (2, 15) and out.dtype == torch.long
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    full = logits(model, out, full_mask, position_ids=positions(full_mask))
    assert torch.equal(full[:, 8:-1].argmax(-1), out[:, 9:])


def test_gsa_padding_and_dtype():
    """Padded keys change nothing: a left-padded row equals the same sequence unpadded; bf16 runs."""
    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", local_layers="hybrid", global_layers="gsa"))
    ids, mask = batch(n=10, left_pad=3)
    padded = logits(model, ids, mask, position_ids=positions(mask))
    alone = logits(model, ids[:1, 3:], mask[:1, 3:])
    assert torch.allclose(padded[0, 3:], alone[0], atol=1e-5)
    model.to(torch.bfloat16)
    out = greedy(model, ids, mask, n=3)
    assert out.shape == (2, 13)


def test_hybrid_with_window_covering_everything_is_exact():
    """A hybrid window longer than the sequence is the exact softmax (GSA never used) on real tokens
    (padded query rows: the original attends uniformly to nothing, GSA returns zeros)."""
    model = tiny_gpt_neo(attention_types=[[["global"], 2]])
    ids, mask = batch(n=10, left_pad=2)
    ref = logits(model, ids, mask)
    convert(model, gsa_config("gpt-neo", global_layers="hybrid", hybrid_window=64))
    real = mask.bool()
    assert torch.allclose(logits(model, ids, mask)[real], ref[real], atol=1e-5)
    set_passthrough(model, True)
    assert (logits(model, ids, mask) - ref).abs().max().item() == 0.0


def test_per_layer_override():
    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", global_layers="exact", local_layers="exact", layers={1: "hybrid"}))
    layers = gsa_layers(model)
    assert list(layers) == ["transformer.h.1.attn.attention"]
    assert layers["transformer.h.1.attn.attention"].mode == "hybrid"


def test_save_from_pretrained_round_trip(tmp_path):
    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", local_layers="hybrid"))
    ids, mask = batch()
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gsa_gpt_neo" and saved["gsa"]["adapter"]["params"]["local_layers"] == "hybrid"
    # nothing in the folder invites transformers to run code from it (docs/safety.md)
    assert not (tmp_path / "gsa_checkpoint.py").exists() and "auto_map" not in saved
    again = load_converted(tmp_path)
    assert type(again) is type(model)
    assert (logits(again, ids, mask) - before).abs().max().item() == 0.0
    for name, bank in banks(model).items():
        for key, value in bank.state_dict().items():
            assert torch.equal(banks(again)[name].state_dict()[key], value)
    # with the auto classes registered (load_converted did it), AutoModelForCausalLM works too
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (logits(auto, ids, mask) - before).abs().max().item() == 0.0


def test_calibration_layers():
    """The adapter describes its layers for gsa_calibrate (q_proj/k_proj/v_proj, scaling 1)."""
    from gsa_calibrate.collect import collect_qk

    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", passthrough=True, local_layers="hybrid"))
    layers = attention_layers(model)
    assert [lay.name for lay in layers] == ["transformer.h.0.attn.attention", "transformer.h.1.attn.attention"]
    assert all(lay.scaling == 1.0 and lay.head_dim == 8 for lay in layers)
    ids, mask = batch()
    vectors = collect_qk(model, layers, [{"input_ids": ids, "attention_mask": mask}])
    q, k = vectors["transformer.h.0.attn.attention"]
    assert q.shape == (4, int(mask.sum()), 8) and k.shape == q.shape
    assert set(vectors) == set(banks(model))


# ----------------------------------------------------------------------------- TinyStories-33M shape
TINYSTORIES = dict(vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=4, num_heads=16,
                   attention_types=[[["global", "local"], 2]], window_size=256, bos_token_id=50256,
                   eos_token_id=50256, pad_token_id=50256)


@pytest.fixture(scope="module")
def tinystories():
    """GPT-Neo at the TinyStories-33M shape, random weights (the real weights need the hub)."""
    return tiny_gpt_neo(**TINYSTORIES)


def test_tinystories_shape_passthrough_and_gsa_generate(tinystories):
    model = tinystories
    assert model.transformer.h[0].attn.attention.head_dim == 48
    ids, mask = batch(n=12, left_pad=4, vocab=50256)
    ref = logits(model, ids, mask)
    ref_gen = greedy(model, ids, mask, n=6)
    convert(model, {"adapter": {"name": "gpt-neo", "params": {"passthrough": True}}})
    diff = (logits(model, ids, mask) - ref).abs().max().item()
    assert diff == 0.0, diff
    assert torch.equal(greedy(model, ids, mask, n=6), ref_gen)
    set_passthrough(model, False)
    out = greedy(model, ids, mask, n=4)
    assert out.shape == (2, 16)


@pytest.mark.slow
def test_tinystories_shape_save_round_trip(tmp_path):
    model = tiny_gpt_neo(**TINYSTORIES)
    convert(model, {"backend": "kernel", "adapter": {"name": "gpt-neo", "params": {"local_layers": "hybrid"}}})
    ids, mask = batch(n=12, left_pad=4, vocab=50256)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    assert (logits(again, ids, mask) - before).abs().max().item() == 0.0
    assert torch.equal(greedy(again, ids, mask, n=4), greedy(model, ids, mask, n=4))


def test_convert_after_from_pretrained_is_converted(tmp_path):
    """transformers 5 keeps the loaded ``model_type`` on the config instance; conversion must still win."""
    from transformers import GPTNeoForCausalLM

    tiny_gpt_neo().save_pretrained(tmp_path)
    model = convert(GPTNeoForCausalLM.from_pretrained(tmp_path, attn_implementation="eager"), gsa_config("gpt-neo"))
    assert is_converted(model)
    assert model.config.model_type == "gsa_gpt_neo"
    assert list(attention_layers(model)) and all(name in gsa_layers(model) for name in
                                                 (layer.name for layer in attention_layers(model)))
