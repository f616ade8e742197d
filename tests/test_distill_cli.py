"""``gsa distill SRC DST`` on a tiny local BERT: settings from flags and a config file, errors, the saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _distill_models import texts, tiny_bert_folder
from gsa_cli.main import main

from gsa_plugins.adapters import gsa_layers, load_converted


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(texts(60)):
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")
    return folder


def test_cli_distils_saves_and_reports(src: Path, corpus: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gsa.toml"
    cfg.write_text('[bank]\nn_splats = 4\n\n[distill]\nbatch_size = 4\nmax_length = 32\ncalib_tokens = 200\n'
                   'stage1_lr = 0.05\n')
    dst = tmp_path / "out"
    code = main(["distill", str(src), str(dst), "--config", str(cfg), "--corpus", str(corpus), "--stage1-steps", "3",
                 "--initializer", "pca", "--window", "2", "--regulariser", "overlap=0.01", "--regulariser",
                 "amplitude-l1=0.001", "--seed", "3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    s = report["settings"]
    assert (s["initializer"], s["stage1_steps"], s["seed"], s["window"], s["batch_size"]) == ("pca", 3, 3, 2, 4)
    assert s["regularisers"] == {"overlap": 0.01, "amplitude-l1": 0.001}
    assert {"overlap", "amplitude-l1"} <= set(report["stage1"]["history"][0])
    model = load_converted(dst / "model")
    layers = gsa_layers(model)
    assert all(layer.mode == "hybrid" and layer.hybrid_window == 2 for layer in layers.values())
    assert next(iter(layers.values())).bank.capacity == 4
    assert json.loads((dst / "distill.json").read_text())["finished"] is True
    assert (dst / "checkpoints" / "last.pt").is_file() and (dst / "model" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(("argv", "message"), [
    (["--regulariser", "sparsity=1"], "unknown regulariser 'sparsity'"),
    (["--initializer", "kmean"], "Did you mean 'kmeans'"),
])
def test_cli_errors_exit_2_with_one_message(src: Path, tmp_path: Path, argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", str(src), str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_cli_rejects_a_bad_stage2_choice(src: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["distill", str(src), str(tmp_path), "--stage2", "qlora"])
