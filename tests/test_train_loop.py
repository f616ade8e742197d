"""The training loop on the ``micro`` layout: loss goes down, seeds determine weights, resume is exact, GSA adapts."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from _train_corpus import MICRO, write_corpus
from gsa_train.loop import TrainSettings, load_trained, lr_at, train

from gsa_core.errors import ConfigError

GSA_ADAPTIVE = {
    "bank": {"n_splats": 4}, "backend": "kernel", "initializer": {"name": "kmeans", "params": {"scale_factor": 4.0}},
    "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}},
    "adaptation": {"enabled": True, "window": 2, "scheduler": {"name": "interval", "params": {"start": 2, "every": 2}},
                   "death": {"name": "low-mass", "params": {"relative_threshold": 0.9}}, "birth": "clone"},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run(tmp_path, corpus, name, **kw):
    return train({**MICRO, "corpus": str(corpus), "out": tmp_path / name, **kw})


def weights(path):
    return load_trained(path).state_dict()


def same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


def test_a_few_steps_reduce_the_loss_and_save_a_reloadable_model(tmp_path, corpus):
    result = run(tmp_path, corpus, "a", steps=25)
    hist = result.metrics["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5
    saved = json.loads((tmp_path / "a" / "train.json").read_text())
    assert saved["final"]["heldout_ppl"] == pytest.approx(result.heldout_ppl)
    assert saved["final"]["heldout_ppl"] < 300  # below uniform over the 300-token vocabulary
    model = load_trained(tmp_path / "a")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    out = model.generate(**tok("The parser", return_tensors="pt"), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] > 2


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, corpus):
    run(tmp_path, corpus, "a", steps=4)
    run(tmp_path, corpus, "b", steps=4)
    run(tmp_path, corpus, "c", steps=4, seed=1)
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    same(a, b)
    assert not torch.equal(a["transformer.h.0.attn.attention.q_proj.weight"],
                           c["transformer.h.0.attn.attention.q_proj.weight"])


@pytest.mark.parametrize("attention", ["softmax", "gsa"])
def test_resume_gives_the_uninterrupted_weights(tmp_path, corpus, attention):
    extra = {"attention": attention, "gsa": GSA_ADAPTIVE} if attention == "gsa" else {}  # slot births/deaths too
    run(tmp_path, corpus, "full", steps=8, **extra)
    stopped = run(tmp_path, corpus, "parts", steps=8, checkpoint_every=4, stop_after=4, **extra)
    assert stopped.metrics == {"stopped_at": 4} and not (tmp_path / "parts" / "train.json").exists()
    resumed = run(tmp_path, corpus, "parts", steps=8, checkpoint_every=4, resume=True, **extra)
    assert resumed.metrics["resumed_from"] == 4
    same(weights(tmp_path / "full"), weights(tmp_path / "parts"))
    if attention == "gsa":
        assert resumed.metrics["adaptation"]["refines"]["refines"] == 3
    with pytest.raises(ConfigError, match=r"settings differ.*seed"):
        run(tmp_path, corpus, "parts", steps=8, resume=True, seed=3, **extra)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(tmp_path, corpus, "none", steps=2, resume=True)


def test_gsa_training_adapts_the_banks(tmp_path, corpus):
    from gsa_plugins.adapters import banks

    result = run(tmp_path, corpus, "g", steps=8, attention="gsa", gsa=GSA_ADAPTIVE)
    m = result.metrics
    assert m["calibration"]["initializer"] == "kmeans"
    refines = m["adaptation"]["refines"]
    assert refines["refines"] >= 3 and refines["births"] + refines["deaths"] > 0
    model = load_trained(tmp_path / "g")
    assert type(model).__name__ == "GSAGPTNeoForCausalLM"
    assert list(banks(model)) == ["transformer.h.0.attn.attention"]  # global layer only; local stays exact
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]


def test_bad_settings_name_the_field_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"attention.*'softmax' or 'gsa'"):
        TrainSettings.build(out=tmp_path, attention="linear")
    with pytest.raises(ConfigError, match="available layouts"):
        TrainSettings.build(out=tmp_path, layout="huge")
    with pytest.raises(ConfigError, match="steps"):
        TrainSettings.build(out=tmp_path, steps=0)


def test_learning_rate_warms_up_then_decays():
    s = TrainSettings.build(out="x", steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(i, s) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lrs[-1] >= 0.1
