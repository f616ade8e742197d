"""gsa eval passkey and passkey-corpus: the format, the scoring, the JSON, bad input."""

from __future__ import annotations

import json
import random
import re

import pytest
from _eval_models import build_models, passkey_tokenizer
from gsa_cli.main import main
from gsa_eval import passkey as passkey_bench
from gsa_eval.passkey_task import INTRO, QUESTION, PasskeyFormat, first_number, is_correct, wilson_interval

from gsa_core.errors import ConfigError


@pytest.fixture(scope="module")
def fmt():
    return PasskeyFormat(passkey_tokenizer())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("eval-models"))


# ----------------------------------------------------------------------------- the format
@pytest.mark.parametrize("tokens", [100, 129, 300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_examples_have_exactly_the_tokens_asked_for(fmt, tokens, depth):
    example = fmt.trial(tokens, depth, 2, seed=0, index=3)
    assert example.tokens == tokens
    assert example.prompt[0] == fmt.tokenizer.eos_token_id
    text = fmt.tokenizer.decode(example.prompt[1:])
    assert text.endswith(QUESTION) and fmt.tokenizer.decode(example.answer).strip() == f"{example.key}."
    needle = f"The pass key is {example.key}. Remember it. {example.key} is the pass key."
    before, after = text.split(needle)
    before, after = len(before) - len(INTRO) - 1, len(after) - len(QUESTION) - 1  # filler characters either side
    assert before >= 0 and after >= 0 and abs(before / (before + after) - depth) < 0.1  # tokens ~ characters here


def test_fine_tuning_examples_ask_several_times(fmt):
    example = fmt.example(400, 0.2, "42", random.Random(0), questions=3)
    text = fmt.tokenizer.decode(example.prompt[1:] + example.answer)
    assert example.tokens == 400 and text.count("What is the pass key? Answer: 42.") == 3


def test_trials_are_a_pure_function_of_the_seed(fmt):
    assert fmt.trial(150, 0.5, 3, 1, 2) == fmt.trial(150, 0.5, 3, 1, 2)
    assert fmt.trial(150, 0.5, 3, 1, 2) != fmt.trial(150, 0.5, 3, 1, 3)
    assert len(fmt.trial(150, 0.5, 3, 1, 2).key) == 3


def test_too_short_or_bad_depth_is_a_config_error(fmt):
    with pytest.raises(ConfigError, match="at least"):
        fmt.trial(10, 0.5, 2, 0, 0)
    with pytest.raises(ConfigError, match="depths"):
        fmt.trial(150, 1.5, 2, 0, 0)


# ----------------------------------------------------------------------------- scoring
def test_a_continuation_is_correct_when_it_starts_with_the_key():
    assert is_correct(" 42.", "42") and is_correct("42", "42")
    assert not is_correct(" 421.", "42") and not is_correct(" 4 2", "42") and not is_correct(" the 42", "42")
    assert first_number("  7 and") == "7" and first_number("none") is None


def test_wilson_interval():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    low, high = wilson_interval(5, 10)  # the textbook value for 5/10 at 95%: 0.2366-0.7634
    assert abs(low - 0.2366) < 1e-4 and abs(high - 0.7634) < 1e-4
    assert wilson_interval(0, 0) == (0.0, 1.0)


def oracle(fmt):
    """Reads the key out of the prompt: always right."""

    def generate(prompt, new_tokens):
        key = re.search(r"The pass key is (\d+)\.", fmt.tokenizer.decode(prompt)).group(1)
        return fmt.ids(f" {key}.")[:new_tokens]

    return generate


def test_an_oracle_scores_one_and_a_constant_scores_zero(fmt):
    right = passkey_bench.score_cell(oracle(fmt), fmt, length=150, depth=0.5, trials=6, digits=4, seed=0)
    assert right["correct"] == 6 and right["accuracy"] == 1.0 and right["ci95"][1] == 1.0
    never = passkey_bench.score_cell(lambda prompt, n: fmt.ids(" 0.")[:n], fmt, length=150, depth=0.5, trials=6,
                                     digits=4, seed=0)  # a 4-digit key is never 0
    assert never["correct"] == 0 and never["accuracy"] == 0.0 and never["ci95"][0] == 0.0


# ----------------------------------------------------------------------------- the command
def test_command_writes_the_report(models, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "passkey", f"soft={models['softmax']}", f"gsa={models['gsa']}", f"rec={models['recall']}",
            "--lengths", "120,200", "--depths", "0,1", "--trials", "2", "--key-digits", "2", "--out", str(out),
            "--quiet", "--chunk", "16", "--recall", "recent", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((out / "passkey.json").read_text())
    assert report["schema"] == "gsa-eval-passkey/1" and (out / "passkey.png").stat().st_size > 0
    labels = [m["label"] for m in report["models"]]
    assert labels == ["soft", "gsa", "rec", "gsa+recall", "rec+recall"]  # --recall: the GSA models again
    kinds = {m["label"]: m["attention"] for m in report["models"]}
    assert kinds["soft"] == "softmax" and kinds["gsa"] == "state" and kinds["rec"] == "recall"
    assert kinds["gsa+recall"] == "recall"
    assert len(report["results"]) == len(labels) * 2 * 2
    for cell in report["results"]:
        assert cell["trials"] == 2 and 0 <= cell["correct"] <= 2 and len(cell["answers"]) == 2
        assert cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1] and cell["cache_bytes"] > 0
    assert set(report["summary"]) == set(labels) and set(report["summary"]["gsa"]) == {"120", "200"}
    assert "| soft | softmax |" in capsys.readouterr().out


def test_recall_adds_no_row_for_a_model_saved_with_that_cache(models):
    """``--recall`` equal to a model's own saved cache (defaults filled in either) re-measures nothing; another
    setting (a different block) is a new variant."""
    import argparse

    from _eval_models import RECALL
    from gsa_eval.models import model_spec

    specs = [model_spec(f"{k}={models[k]}") for k in ("softmax", "gsa", "recall")]
    same = {"name": RECALL["name"], "params": {**RECALL["params"]}}
    other = {"name": RECALL["name"], "params": {**RECALL["params"], "block": RECALL["params"]["block"] * 2}}
    labels = [(spec.label, recall is not None)
              for spec, recall in passkey_bench.variants(argparse.Namespace(models=specs, recall=same))]
    assert labels == [("softmax", False), ("gsa", False), ("recall", False), ("gsa", True)]
    labels = [(spec.label, recall is not None)
              for spec, recall in passkey_bench.variants(argparse.Namespace(models=specs, recall=other))]
    assert labels == [("softmax", False), ("gsa", False), ("recall", False), ("gsa", True), ("recall", True)]


def test_an_oracle_model_scores_one_through_the_command(models, tmp_path, monkeypatch, fmt):
    """The whole path (format, prompts, scoring, summary) with a stand-in for greedy decoding."""
    def cheat(model, prompt, new_tokens, chunk):
        return oracle(fmt)(prompt, new_tokens), None

    monkeypatch.setattr(passkey_bench, "greedy", cheat)
    monkeypatch.setattr(passkey_bench, "cache_bytes", lambda cache: 0)
    assert main(["eval", "passkey", str(models["gsa"]), "--lengths", "150", "--depths", "0.5", "--trials", "3",
                 "--key-digits", "3", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "passkey.json").read_text())
    assert report["summary"]["gsa"]["150"]["accuracy"] == 1.0


def test_lengths_past_the_positions_need_a_strategy(models, tmp_path, capsys):
    argv = ["eval", "passkey", str(models["gsa"]), "--lengths", "300", "--trials", "1", "--key-digits", "2",
            "--depths", "0.5", "--out", str(tmp_path / "a"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "256 learned positions" in err and "--positions" in err and "tile" in err
    assert not (tmp_path / "a").exists()  # nothing written before the arguments were checked
    assert main([*argv, "--positions", "tile"]) == 0
    report = json.loads((tmp_path / "a" / "passkey.json").read_text())
    assert report["models"][0]["positions"] == 300 and report["models"][0]["trained_positions"] == 256


@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "--trials"),
    (["--positions", "tilee"], "Did you mean 'tile'"),
    (["--key-digits", "40"], "--key-digits"),
    (["--recall", "self-recal"], "Did you mean 'self-recall'"),
])
def test_bad_input_is_one_message(models, tmp_path, capsys, extra, message):
    argv = ["eval", "passkey", str(models["gsa"]), "--lengths", "120", "--out", str(tmp_path), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_models_and_duplicate_labels(models, tmp_path, capsys):
    assert main(["eval", "passkey", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "passkey", f"a={models['gsa']}", f"a={models['softmax']}", "--out", str(tmp_path)]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["eval", "passkey", "--out", str(tmp_path)]) == 2
    assert "at least one MODEL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: exit status 2 and its usage line
        main(["eval", "passkey", str(models["gsa"]), "--depths", "1.5"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- the corpus recipe
def test_corpus_rows_are_whole_examples(tmp_path, capsys):
    from gsa_train.data import encode_blocks, load_texts

    from gsa_plugins.adapters.hf import load_tokenizer

    out = tmp_path / "corpus"
    argv = ["eval", "passkey-corpus", str(out), "--context", "200", "--examples", "30", "--vocab-size", "300"]
    assert main(argv) == 0
    record = json.loads((out / "corpus.json").read_text())
    assert record["examples"] == 30 and "--block-len 200" in record["train"]
    tokenizer = load_tokenizer(out / "tokenizer")
    texts = load_texts(out / "texts")
    blocks = encode_blocks(tokenizer, texts.train, 200)
    assert len(blocks) == len(texts.train)  # every document is exactly one row
    eos = tokenizer.eos_token_id
    assert (blocks[:, 0] == eos).all() and int((blocks == eos).sum()) == len(blocks)
    assert main(["eval", "passkey-corpus", str(out), "--examples", "3"]) == 2  # not empty: refused
    assert "not empty" in capsys.readouterr().err
