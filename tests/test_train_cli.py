"""``gsa train`` on a corpus folder; bad choices are clear errors; 2 torchrun processes match 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _train_corpus import write_corpus
from gsa_cli.main import main
from gsa_train.loop import load_trained
from test_train_distributed import torchrun

ARGS = ["--layout", "micro", "--vocab-size", "300", "--batch-size", "4", "--block-len", "32", "--warmup-steps", "2",
        "--eval-blocks", "8", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_train_writes_model_and_metrics_that_reload(tmp_path, corpus, capsys):
    out = tmp_path / "m"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--steps", "6", "--json", *ARGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "train.json").read_text())
    assert summary["heldout_ppl"] == pytest.approx(metrics["final"]["heldout_ppl"])
    assert metrics["world_size"] == 1 and metrics["corpus"]["documents"] == 24
    model = load_trained(out)
    assert model.config.vocab_size <= 300 and (out / "tokenizer.json").exists()


def test_gsa_with_a_config_file(tmp_path, corpus):
    cfg = tmp_path / "gsa.toml"
    cfg.write_text('backend = "dense"\n[bank]\nn_splats = 4\n[adapter]\nname = "gpt-neo"\n'
                   '[adapter.params]\nglobal_layers = "gsa"\nlocal_layers = "gsa"\n')
    out = tmp_path / "g"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--steps", "2", "--attention", "gsa",
                 "--config", str(cfg), *ARGS]) == 0
    from gsa_plugins.adapters import banks

    assert len(banks(load_trained(out))) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--layout", "huge"], ["invalid choice: 'huge'", "tinystories-33m", "reference", "tiny", "micro"]),
    (["--attention", "linear"], ["invalid choice: 'linear'", "softmax", "gsa"]),
])
def test_bad_choices_are_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exc.value.code == 2 and all(part in err for part in message)


def test_bad_values_exit_2_with_one_message(tmp_path, corpus, capsys):
    assert main(["train", "--corpus", str(corpus), "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["train", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path), *ARGS]) == 2
    assert "unknown corpus" in capsys.readouterr().err
    assert main(["train", "--corpus", str(corpus), "--out", str(tmp_path), "--config", "x.toml", *ARGS]) == 2
    assert "--attention gsa" in capsys.readouterr().err


#: ``gsa train`` in float64: see :func:`test_two_torchrun_processes_match_one_process`.
FLOAT64_MAIN = ("import sys, torch\ntorch.set_default_dtype(torch.float64)\n"
                "from gsa_cli.main import main\nsys.exit(main())\n")


def test_two_torchrun_processes_match_one_process(tmp_path, corpus):
    """Same global batch: 2 gloo processes (2 rows each) end with the 1-process weights.

    The two runs round each gradient sum differently (``δ ≈ N·u·S``), and AdamW's step moves by up to
    ``lr·δ/eps`` for that, most where a gradient is near zero; summed over the steps the weights may differ by
    ``ρ·Σ lr`` with ``ρ ≈ N·u·S/eps``. In float32 that exceeds every step's size (``u = 6e-8``, ``eps = 1e-8``),
    so the agreement would depend on how many gradients lie near zero on a given CPU; in float64
    (``u = 1.1e-16``, ``N·S`` of order 100) ``ρ ≈ 1e-6``, and the test allows ``ρ = 1e-4``.
    """
    from gsa_train.loop import TrainSettings, lr_at

    runner = tmp_path / "gsa_float64.py"
    runner.write_text(FLOAT64_MAIN)
    common = ["train", "--corpus", str(corpus), "--steps", "4", *ARGS]
    one = subprocess.run([sys.executable, str(runner), *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun(tmp_path, str(runner), *common, "--out", str(tmp_path / "two"))
    assert json.loads((tmp_path / "two" / "train.json").read_text())["world_size"] == 2
    a, b = load_trained(tmp_path / "one").state_dict(), load_trained(tmp_path / "two").state_dict()
    settings = TrainSettings(out=tmp_path, steps=4, warmup_steps=2)
    tolerance = 1e-4 * sum(lr_at(step, settings) for step in range(settings.steps))
    for k in a:
        assert a[k].dtype != torch.float32, k
        gap = float((a[k].double() - b[k].double()).abs().max()) if a[k].is_floating_point() else 0.0
        assert gap <= tolerance if a[k].is_floating_point() else torch.equal(a[k], b[k]), (k, gap, tolerance)
