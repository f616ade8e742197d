"""Adapter errors, shared mask/hybrid helpers, GSA checkpoints without the package, and ``gsa convert``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _adapter_models import batch, gsa_config, logits, tiny_bert, tiny_gpt_neo
from torch import nn

from gsa_core.bank import SplatBank
from gsa_core.errors import ConfigError, GSAError
from gsa_core.masks import MaskSpec
from gsa_plugins.adapters import (
    ModelMismatchError,
    UnsupportedModelError,
    convert,
    detect_adapter,
    load_converted,
)
from gsa_plugins.adapters.layers import allowed_from_hf, hybrid_attention, spec_from_allowed


# ----------------------------------------------------------------------------- unsupported models
def test_unsupported_model_lists_the_adapters():
    with pytest.raises(UnsupportedModelError) as err:
        convert(nn.Linear(4, 4))
    message = str(err.value)
    assert "no GSA adapter supports Linear" in message
    for listed in ("gpt-neo (gpt_neo)", "bert (bert)", "llama (llama)", "examples/gsa-example-adapter"):
        assert listed in message


def test_unsupported_hf_family_and_wrong_adapter():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    with pytest.raises(UnsupportedModelError, match=r"OPTForCausalLM \(model_type 'opt'\).*Available adapters: "):
        detect_adapter(opt)
    with pytest.raises(UnsupportedModelError, match=r"adapter 'bert' does not support GPTNeoForCausalLM.*gpt-neo"):
        convert(tiny_gpt_neo(), adapter="bert")
    with pytest.raises(GSAError, match=r"unknown adapter 'gpt_neo'\. Did you mean 'gpt-neo'"):
        convert(tiny_gpt_neo(), adapter="gpt_neo")


# ----------------------------------------------------------------------------- configs that do not fit
def test_config_for_another_shape_names_the_mismatch():
    shape = {"n_layers": 4, "n_heads": 16, "head_dim": 48}  # TinyStories-33M
    with pytest.raises(ModelMismatchError) as err:
        convert(tiny_gpt_neo(), gsa_config("gpt-neo", shape=shape))
    message = str(err.value)
    assert "head dim 48 vs 8" in message and "layers 4 vs 2" in message and "heads 16 vs 4" in message


def test_saved_config_reused_on_another_model(tmp_path):
    model = convert(tiny_gpt_neo(), gsa_config("gpt-neo"))
    other = tiny_gpt_neo(hidden_size=48, num_heads=4)  # head dim 12
    with pytest.raises(ModelMismatchError, match="head dim 8 vs 12"):
        convert(other, model.config.gsa)


def test_layer_index_out_of_range():
    with pytest.raises(ModelMismatchError, match=r"layer\(s\) \[5\].*has 2 layers"):
        convert(tiny_gpt_neo(), gsa_config("gpt-neo", layers={5: "gsa"}))


def test_hybrid_needs_a_window_and_windows_need_dense():
    with pytest.raises(ModelMismatchError, match="set no hybrid_window"):
        convert(tiny_bert(), gsa_config("bert", self_attention="hybrid"))
    with pytest.raises(ModelMismatchError, match="backend 'kernel' cannot serve"):
        convert(tiny_gpt_neo(), gsa_config("gpt-neo", backend="kernel", local_layers="gsa"))


def test_unwrappable_attention_implementation():
    model = tiny_bert()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ModelMismatchError, match="attn_implementation 'flex_attention'"):
        convert(model, gsa_config("bert"))


def test_bad_params_are_config_errors():
    with pytest.raises(ConfigError, match="local_layers"):
        convert(tiny_gpt_neo(), gsa_config("gpt-neo", local_layers="fast"))


def test_conversion_leaves_the_callers_config_alone():
    first = tiny_gpt_neo()
    shared = first.config
    from transformers import GPTNeoForCausalLM

    second = GPTNeoForCausalLM(shared).eval()
    convert(first, gsa_config("gpt-neo"))
    assert type(shared).__name__ == "GPTNeoConfig" and not hasattr(shared, "gsa")
    assert second.config.model_type == "gpt_neo"
    convert(second, gsa_config("gpt-neo"))  # still convertible
    with pytest.raises(UnsupportedModelError, match="already GSA-converted"):
        convert(second, gsa_config("gpt-neo"))


# ----------------------------------------------------------------------------- masks and hybrid
def test_masks_from_transformers():
    from transformers.masking_utils import causal_mask_function, eager_mask, sdpa_mask

    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    for maker in (sdpa_mask, eager_mask):
        m = maker(batch_size=2, q_length=2, kv_length=6, q_offset=4, mask_function=causal_mask_function,
                  attention_mask=attn, allow_is_causal_skip=False)
        spec = spec_from_allowed(allowed_from_hf(m), 2, 2, 6, causal=True)
        assert spec.causal and spec.attend is None and torch.equal(spec.key_padding, attn)
        # a bidirectional padding mask seen by a causal-capable module is recognised as non-causal
    bidir = attn[:, None, None, :].expand(2, 1, 6, 6)
    spec = spec_from_allowed(bidir, 2, 6, 6, causal=True)
    assert not spec.causal and torch.equal(spec.key_padding, attn)
    odd = torch.rand(2, 1, 6, 6) > 0.5  # not causal + padding: an arbitrary mask (dense only)
    assert spec_from_allowed(odd, 2, 6, 6, causal=False).attend is not None
    with pytest.raises(ValueError, match="position bias"):
        allowed_from_hf(torch.randn(2, 1, 6, 6))


def test_hybrid_attention_matches_its_definition():
    torch.manual_seed(0)
    bank = SplatBank(2, 4, 3)
    with torch.no_grad():
        bank.centers.normal_()
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)
    mask = MaskSpec(causal=True, key_padding=torch.tensor([[False, True, True, True, True]]))
    out = hybrid_attention(q, k, v, bank, mask, scaling=0.5, window=2)
    # reference: scores by definition, one softmax
    from gsa_plugins.backends.dense import pair_log_weights

    exact = (q @ k.transpose(-1, -2)) * 0.5
    s = 0.5**0.5
    logw = pair_log_weights(bank.log_features(q * s), bank.log_features(k * s))
    i, j = torch.arange(5).unsqueeze(1), torch.arange(5).unsqueeze(0)
    scores = torch.where(j > i - 2, exact, logw).masked_fill(~mask.allowed(5, 5), float("-inf"))
    ref = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    assert torch.allclose(out[..., 1:, :], ref[..., 1:, :], atol=1e-6)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))  # sees only a padded key
    # a window covering every key is the exact causal softmax
    far = hybrid_attention(q, k, v, bank, MaskSpec(causal=True), scaling=1.0, window=100)
    assert torch.allclose(far, torch.softmax((q @ k.transpose(-1, -2)).masked_fill(j > i, float("-inf")), -1) @ v,
                          atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints
BLOCK_GSA = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0].startswith("gsa_"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
""")


def _run(code: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def saved_gsa(tmp_path):
    model = convert(tiny_gpt_neo(), gsa_config("gpt-neo"))
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_loading_without_the_package_never_runs_code_from_the_folder(saved_gsa, tmp_path):
    """A checkpoint holds no code and no ``auto_map``: even ``trust_remote_code=True`` finds nothing to run, and
    transformers refuses the unknown ``gsa_*`` model type (never a silent plain load, never a prompt)."""
    _, path = saved_gsa
    (path / "gsa_checkpoint.py").write_text("open(__file__ + '.ran', 'w').close()\n")  # planted by someone else
    code = BLOCK_GSA + textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        for trust in (True, False):
            try:
                AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=trust)
                print("LOADED")
            except Exception as exc:
                print(type(exc).__name__, "::", str(exc).replace(chr(10), " "))
    """)
    result = _run(code, tmp_path)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert all("gsa_gpt_neo" in line for line in lines) and "LOADED" not in result.stdout
    assert not (path / "gsa_checkpoint.py.ran").exists()


def test_load_converted_rejects_plain_checkpoints(tmp_path):
    tiny_gpt_neo().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a GSA checkpoint"):
        load_converted(tmp_path)


@pytest.mark.slow
def test_fresh_process_loads_with_load_converted(saved_gsa, tmp_path):
    model, path = saved_gsa
    ids, mask = batch()
    expected = logits(model, ids, mask)
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch
        from gsa_plugins.adapters import load_converted
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = load_converted({str(path)!r}).eval()
        with torch.no_grad():
            out = model(input_ids=io["ids"], attention_mask=io["mask"]).logits
        print(type(model).__name__, float((out - io["expected"]).abs().max()))
    """)
    result = _run(code, tmp_path)
    assert result.stdout.split() == ["GSAGPTNeoForCausalLM", "0.0"], result.stdout + result.stderr


# ----------------------------------------------------------------------------- gsa convert
def test_cli_convert(tmp_path, capsys):
    from gsa_cli.main import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    original = tiny_gpt_neo()
    original.save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    cfg = tmp_path / "gsa.toml"
    cfg.write_text('[bank]\nn_splats = 8\n\n[adapter]\nname = "gpt-neo"\nparams = { local_layers = "hybrid" }\n')
    assert main(["convert", str(src), str(dst), "--config", str(cfg), "--passthrough", "--verify", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adapter"] == "gpt-neo" and summary["gsa_layers"] == 2 and summary["passthrough"]
    assert summary["reload_max_abs_diff"] == 0.0 and summary["passthrough_max_abs_diff"] == 0.0
    assert summary["tokenizer_files"] == ["tokenizer.json"]
    saved = json.loads((dst / "config.json").read_text())
    assert saved["gsa"]["bank"]["n_splats"] == 8
    ids, mask = batch()
    assert (logits(load_converted(dst), ids, mask) - logits(original, ids, mask)).abs().max().item() == 0.0
    # a config that does not fit: exit status 2 and one message
    bad = tmp_path / "bad.toml"
    bad.write_text('[adapter]\nname = "gpt-neo"\nparams = { layers = { 7 = "gsa" } }\n')
    assert main(["convert", str(src), str(tmp_path / "x"), "--config", str(bad)]) == 2
    assert "has 2 layers" in capsys.readouterr().err
