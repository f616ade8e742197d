"""gsa eval ppl: windows ending at shared anchors, losses by position, streaming equals one forward, bad input."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from _eval_models import build_models
from gsa_cli.main import main
from gsa_eval.ppl import buckets, evaluate_context, token_stream, window_losses

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "two", "dogs", "ran", "past", "the", "old", "red", "barn",
         "and", "one", "bird", "sang"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("ppl-models"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(120)) + ".\n")
    return folder


def load(path):
    from gsa_train.loop import load_trained

    from gsa_plugins.adapters.hf import load_tokenizer

    return load_trained(path).eval(), load_tokenizer(path)


def test_buckets_cover_every_prediction():
    assert buckets(512) == [(0, 64), (64, 128), (128, 256), (256, 511)]
    assert buckets(40) == [(0, 64)] and buckets(65) == [(0, 64)]
    for context in (2, 100, 1000):
        spans = buckets(context)
        assert spans[0][0] == 0 and spans[-1][1] >= context - 1
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("name", ["softmax", "gsa", "recall"])
def test_losses_through_the_cache_equal_one_forward(models, name):
    model, tokenizer = load(models[name])
    window = torch.randint(3, len(tokenizer), (90,), generator=torch.Generator().manual_seed(1))
    streamed, memory = window_losses(model, window, chunk=7)
    with torch.no_grad():
        logits = model(input_ids=window[None]).logits[0, :-1]
    direct = torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="none")
    torch.testing.assert_close(streamed, direct, rtol=1e-4, atol=1e-4)  # fp32 logits, other attention blocking
    assert memory > 0


def test_every_context_predicts_the_same_last_tokens():
    """A model without positions whose layers see only the last 8 tokens (exact sliding windows, through the
    recurrent cache) gives the same loss on the shared tail whatever the context: the windows end at the same
    anchors."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gsa_plugins.adapters import convert

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50, max_position_embeddings=256, hidden_size=32, num_layers=2,
                                           num_heads=4, attention_types=[[["local", "local"], 1]], window_size=8))
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    convert(model.eval(), {"bank": {"n_splats": 4},
                           "adapter": {"name": "gpt-neo", "params": {"local_layers": "exact"}}})
    data = torch.randint(3, 50, (400,), generator=torch.Generator().manual_seed(2))
    short, long = (evaluate_context(model, data, [200, 400], c, chunk=50, tail=20) for c in (40, 200))
    assert short["tail_tokens"] == long["tail_tokens"] == 20
    assert abs(short["tail_loss"] - long["tail_loss"]) < 1e-5  # fp32 logits of the same tokens, other blocking
    assert short["predictions"] == 2 * 39 and len(long["buckets"]) == len(buckets(200))
    shifted = evaluate_context(model, data, [199, 399], 40, chunk=50, tail=20)
    assert abs(shifted["tail_loss"] - short["tail_loss"]) > 1e-3  # other tokens: another loss


def test_command_writes_the_report(models, corpus, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "ppl", f"soft={models['softmax']}", f"gsa={models['gsa']}", "--corpus", str(corpus),
            "--contexts", "32,128", "--windows", "2", "--tail", "16", "--chunk", "50", "--out", str(out), "--quiet",
            "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((out / "ppl_context.json").read_text())
    assert report["schema"] == "gsa-eval-ppl/1" and (out / "ppl_context.png").stat().st_size > 0
    assert [m["label"] for m in report["models"]] == ["soft", "gsa"]
    assert [(r["model"], r["context"]) for r in report["results"]] == [("soft", 32), ("soft", 128), ("gsa", 32),
                                                                       ("gsa", 128)]
    for r in report["results"]:
        assert r["windows"] == 2 and r["predictions"] == 2 * (r["context"] - 1) and r["tail_tokens"] == 16
        assert r["loss"] > 0 and abs(r["ppl"] - 2.718281828 ** r["loss"]) < 1e-6 * r["ppl"]
        assert [(b["start"], b["end"]) for b in r["buckets"]] == buckets(r["context"])
    assert (out / "ppl_context.md").read_text().startswith("| model | attention |")


def test_token_stream_puts_an_eos_before_every_document(models):
    _, tokenizer = load(models["gsa"])
    ids = token_stream(tokenizer, ["a cat", "the dog"])
    assert int((ids == tokenizer.eos_token_id).sum()) == 2 and int(ids[0]) == tokenizer.eos_token_id


@pytest.mark.parametrize("extra, message", [
    (["--contexts", "100000", "--positions", "tile"], "fewer than the longest context"),
    (["--windows", "0"], "--windows"),
    (["--contexts", "1"], "at least 2"),
    (["--contexts", "300"], "--positions"),
])
def test_bad_input_is_one_message(models, corpus, tmp_path, capsys, extra, message):
    argv = ["eval", "ppl", str(models["gsa"]), "--corpus", str(corpus), "--out", str(tmp_path), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err)
