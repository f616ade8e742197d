"""The widened adapter contract: every registered adapter implements it, and its facts replace per-family tables."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _adapter_models import tiny_bert, tiny_bert_decoder, tiny_gpt_neo, tiny_llama
from _distill_models import WORDS, texts
from gsa_cli.main import main
from gsa_generate.cache import decode_plans

from gsa_core.protocols import ModelAdapter
from gsa_core.registry import get_registry
from gsa_plugins.adapters import (
    adapter_for,
    adapter_for_config,
    convert,
    detect_adapter,
    gsa_layers,
    load_converted,
    load_kwargs,
)
from gsa_plugins.adapters.base import UnsupportedModelError

#: What integrations ask an adapter (gsa_core.protocols.ModelAdapter's docstring documents each).
CONTRACT = {"name", "model_types", "matches", "convert", "apply", "attn_implementation", "sites", "attention_layers",
            "lora_targets", "hybrid_params", "forward_inputs", "decode_plan"}


def bert2bert():
    from transformers import EncoderDecoderModel

    model = EncoderDecoderModel(encoder=tiny_bert(), decoder=tiny_bert_decoder()).eval()
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    return model


def test_the_protocol_names_the_contract() -> None:
    members = {n for n in vars(ModelAdapter) if not n.startswith("_")} | set(typing.get_type_hints(ModelAdapter))
    assert members == CONTRACT


def test_every_registered_adapter_implements_it() -> None:
    registry = get_registry()
    names = registry.names("adapter")
    assert {"bert", "encoder-decoder", "gpt-neo", "llama"} <= set(names)
    for name in names:
        adapter = registry.build("adapter", name)  # build() itself rejects what does not implement the protocol
        assert isinstance(adapter, ModelAdapter)
        missing = [m for m in CONTRACT if not hasattr(adapter, m)]
        assert not missing, f"adapter {name!r} lacks {missing}"
        assert adapter.model_types, f"adapter {name!r} names no model type"


@pytest.mark.parametrize(("make", "targets"), [
    # the tables the distiller used to keep (LORA_TARGETS), now derived from each family's attention modules
    (tiny_bert, ["query", "key", "value"]),
    (tiny_gpt_neo, ["q_proj", "k_proj", "v_proj", "out_proj"]),
    (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (bert2bert, ["query", "key", "value"]),
])
def test_lora_targets(make, targets) -> None:
    model = make()  # peft matches target_modules as a set: the order is the modules' order, not a fact
    assert sorted(detect_adapter(model).lora_targets(model)) == sorted(targets)
    convert(model, {"bank": {"n_splats": 4}})
    assert sorted(adapter_for(model).lora_targets(model)) == sorted(targets)  # its converted adapter agrees


def test_attention_implementation_comes_from_the_adapter() -> None:
    from transformers import BertConfig, EncoderDecoderConfig, GPTNeoConfig, LlamaConfig

    assert load_kwargs(GPTNeoConfig()) == {"attn_implementation": "eager"}
    assert load_kwargs(BertConfig()) == {"attn_implementation": "sdpa"}
    assert load_kwargs(LlamaConfig()) == {"attn_implementation": "sdpa"}
    composite = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(), BertConfig(is_decoder=True))
    assert load_kwargs(composite) == {"attn_implementation": "sdpa"}
    mixed = SimpleNamespace(model_type="encoder-decoder", encoder=BertConfig(), decoder=GPTNeoConfig())
    assert adapter_for_config(mixed).attn_implementation(mixed) == {"encoder": "sdpa", "decoder": "eager"}
    assert adapter_for_config(SimpleNamespace(model_type="no-such-family")) is None
    assert load_kwargs(SimpleNamespace(model_type="no-such-family")) == {}


def test_encoder_decoder_sites_hybrid_params_and_inputs() -> None:
    model = bert2bert()
    adapter = detect_adapter(model)
    sites = adapter.sites(model)
    modules = dict(model.named_modules())
    assert len(sites) == 6 and all(modules[s.name] is s.module for s in sites)
    assert sorted(s.kind for s in sites) == ["cross", "cross", "self", "self", "self", "self"]
    assert {s.name.split(".")[0] for s in sites} == {"encoder", "decoder"}
    params = adapter.hybrid_params(model, {"decoder": {"layers": {1: "exact"}}}, 8)
    assert params["encoder"]["hybrid_window"] == params["decoder"]["hybrid_window"] == 8
    assert params["encoder"]["layers"] == {0: "hybrid", 1: "hybrid"}
    assert params["decoder"]["layers"] == {0: "hybrid", 1: "exact"}  # an explicit choice wins
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    inputs = adapter.forward_inputs(model, batch)
    assert inputs["decoder_input_ids"] is batch["input_ids"]
    assert inputs["decoder_attention_mask"] is batch["attention_mask"]
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, 3, 101)  # one forward runs every attention layer
    convert(model, {"bank": {"n_splats": 4}})
    assert decode_plans(model) is None  # generate() keeps transformers' encoder-decoder cache
    with pytest.raises(UnsupportedModelError, match="generates with transformers' own cache"):
        adapter_for(model).decode_plan(model)


# ----------------------------------------------------------------------------- distillation on bert2bert
@pytest.fixture(scope="module")
def bert2bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``save_pretrained`` of a tiny bert2bert (two tiny BERTs, the decoder with cross-attention) and a tokenizer."""
    from transformers import BertConfig, BertLMHeadModel, BertModel, BertTokenizerFast, EncoderDecoderModel

    path = tmp_path_factory.mktemp("bert2bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    shape = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
    model = EncoderDecoderModel(encoder=BertModel(BertConfig(**shape)),
                                decoder=BertLMHeadModel(BertConfig(**shape, is_decoder=True, add_cross_attention=True)))
    model.config.decoder_start_token_id, model.config.pad_token_id = 2, 0
    model.save_pretrained(path)
    return path


def test_cli_distils_a_bert2bert_with_a_window(bert2bert_folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts(40)):
        (corpus / f"doc{i:02d}.txt").write_text(text + "\n")
    cfg = tmp_path / "gsa.toml"
    cfg.write_text("[bank]\nn_splats = 4\n\n[distill]\nbatch_size = 4\nmax_length = 32\ncalib_tokens = 200\n")
    dst = tmp_path / "out"
    code = main(["distill", str(bert2bert_folder), str(dst), "--config", str(cfg), "--corpus", str(corpus),
                 "--stage1-steps", "3", "--window", "8", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["finished"] is True and len(report["stage1"]["history"]) >= 1
    not_calibrated = report["calibration"]["not_calibrated"]
    assert len(not_calibrated) == 2 and all(".crossattention." in name for name in not_calibrated)
    model = load_converted(dst / "model").eval()
    layers = gsa_layers(model)
    assert len(layers) == 6
    for name, layer in layers.items():
        if ".crossattention." in name:
            assert layer.mode == "gsa"  # hybrid needs self-attention
        else:
            assert layer.mode == "hybrid" and layer.hybrid_window == 8, name
    ids = torch.tensor([[2, 8, 9, 10, 3]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids).logits
    assert out.shape == (1, 5, model.config.decoder.vocab_size) and torch.isfinite(out).all()
