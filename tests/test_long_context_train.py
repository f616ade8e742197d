"""``gsa train --context N --resume-from MODEL``: continued training of a saved model at a longer context."""

from __future__ import annotations

import json

import pytest
import torch
from _train_corpus import MICRO, write_corpus
from gsa_cli.main import main
from gsa_train.loop import TrainSettings, train

from gsa_core.errors import ConfigError
from gsa_plugins.adapters import load_converted
from gsa_plugins.adapters.long_inputs import prefill_chunk, set_prefill_chunk
from gsa_plugins.adapters.positions import extend_positions, position_limit

QUICK = {k: v for k, v in MICRO.items() if k not in ("layout", "vocab_size", "block_len")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=40, sentences=30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A micro GPT-Neo with its tokenizer (64 positions), converted (kernel global layers, exact local ones),
    extended to 256 positions (interpolate), with a prefill chunk of 64 so that a 256-token training row
    takes the linear-memory path; saved as gsa convert would."""
    from gsa_train.data import load_texts
    from gsa_train.layouts import gpt_neo_config
    from gsa_train.tokenizer import train_tokenizer
    from transformers import GPTNeoForCausalLM

    from gsa_plugins.adapters import convert

    folder = tmp_path_factory.mktemp("models") / "micro-256"
    tokenizer = train_tokenizer(load_texts(str(corpus)).train, 300, model_max_length=64, save_to=folder)
    torch.manual_seed(0)
    config = gpt_neo_config("micro", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = convert(GPTNeoForCausalLM(config), {"bank": {"n_splats": 8}, "backend": "kernel",
                                                 "adapter": {"name": "gpt-neo"}})
    extend_positions(model, 256, "interpolate")
    set_prefill_chunk(model, 64)
    model.save_pretrained(folder)
    return folder


def test_resume_from_continues_a_converted_model_at_a_longer_context(tmp_path, corpus, trained):
    before = load_converted(trained)
    result = train({**QUICK, "out": tmp_path / "ctx", "corpus": str(corpus), "resume_from": trained,
                    "block_len": 256, "steps": 3, "batch_size": 2, "eval_blocks": 2})
    after = load_converted(tmp_path / "ctx")
    assert position_limit(after) == 256 and prefill_chunk(after) == 64
    # the extension record travels, and rows up to the new context count as trained (a later extension keeps them)
    assert before.config.gsa["long_context"]["trained_positions"] == 64
    assert after.config.gsa["long_context"] == {**before.config.gsa["long_context"], "trained_positions": 256}
    assert result.metrics["settings"]["attention"] == "gsa"
    assert result.metrics["layout"]["max_position_embeddings"] == 256
    assert result.metrics["calibration"] is None  # the saved banks are continued, not re-initialised
    changed = [n for n, p in after.state_dict().items() if p.is_floating_point()
               and not torch.equal(p, before.state_dict()[n])]
    assert any(".gsa.bank." in n for n in changed) and any("wpe" in n for n in changed)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.metrics["history"])
    assert result.metrics["corpus"]["train_blocks"] > 0 and result.metrics["final"]["heldout_tokens"] == 2 * 255


def test_a_context_past_the_positions_is_one_message_naming_the_options(tmp_path, corpus, trained):
    with pytest.raises(ConfigError) as info:
        TrainSettings.build(**QUICK, out=tmp_path / "x", corpus=str(corpus), resume_from=trained, block_len=512)
    text = str(info.value)
    assert "256 learned positions" in text and "--max-positions N --positions NAME" in text and "interpolate" in text


def test_the_cli_takes_context_and_resume_from(tmp_path, corpus, trained, capsys):
    base = ["train", "--corpus", str(corpus), "--resume-from", str(trained), "--steps", "2", "--batch-size", "2",
            "--eval-blocks", "2", "--no-progress", "--json"]
    assert main([*base, "--out", str(tmp_path / "cli"), "--context", "128"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "resumed" and summary["attention"] == "gsa" and summary["steps"] == 2
    for extra, message in ((["--context", "600"], "256 learned positions"),
                           (["--context", "64", "--layout", "micro"], "drop --layout"),
                           (["--context", "64", "--block-len", "32"], "same setting")):
        status = main([*base, "--out", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err
        assert status == 2 and message in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "bad").exists()  # refused before anything was written


@pytest.mark.parametrize("strategy", ["tile", "none"])
def test_training_from_scratch_remakes_the_position_rows_it_never_trained(tmp_path, corpus, strategy):
    """Rows of 16 tokens train only the first 16 of the micro layout's 64 positions; the other 48 would keep their
    random initialisation and be read silently by a longer input. The saved table is rebuilt from the trained rows
    by ``positions`` (or cut to them), and a converted model records how many rows were trained."""
    from gsa_train.loop import load_trained

    from gsa_core.registry import get_registry

    result = train({**MICRO, "out": tmp_path / strategy, "corpus": str(corpus), "attention": "gsa",
                    "gsa": {"bank": {"n_splats": 4}, "backend": "kernel"}, "block_len": 16, "positions": strategy,
                    "steps": 2, "eval_blocks": 2, "calibration_tokens": 64})
    model = load_trained(tmp_path / strategy)
    table = model.transformer.wpe.weight.detach()
    rows = 16 if strategy == "none" else 64
    assert result.metrics["positions"] == {"trained": 16, "strategy": strategy, "table": rows}
    assert tuple(table.shape) == (rows, 32) and position_limit(model) == rows
    if strategy != "none":
        # the trained rows stay as trained; the rest is exactly the strategy applied to them
        expected = get_registry().build("positions", strategy).extend(table[:16], 64)
        assert torch.equal(table, expected)
        assert model.config.gsa["long_context"]["trained_positions"] == 16
        extend_positions(model, 128, "interpolate")  # a later extension starts from the 16 trained rows
        assert torch.equal(model.transformer.wpe.weight.detach(),
                           get_registry().build("positions", "interpolate").extend(table[:16], 128))


@pytest.mark.parametrize(("name", "message"), [("tilee", "Did you mean 'tile'"),
                                             ("interpolate", "keeps the trained rows: none, tile")])
def test_a_positions_strategy_that_cannot_fill_untrained_rows_is_one_message(tmp_path, corpus, capsys, name, message):
    """An unknown name, or one that would move the trained rows (interpolate stretches every position)."""
    status = main(["train", "--corpus", str(corpus), "--layout", "micro", "--out", str(tmp_path / "bad"),
                   "--positions", name, "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
