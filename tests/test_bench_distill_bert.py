"""``gsa bench distill_bert`` plumbing on a tiny local BERT and a text folder (the real run uses MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _distill_models import WORDS, tiny_bert_folder
from gsa_bench.distill_bert import markdown_table, token_stats
from gsa_cli.main import main


def test_token_stats_counts_pairs_outside_the_window() -> None:
    import torch

    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    stats = token_stats([{"attention_mask": mask}], [1])
    # n=4: pairs |i-j|>1 = 6 of 16; n=2: 0 of 4
    assert stats["gsa_pair_share"]["1"] == pytest.approx(6 / 20)
    assert stats["tokens_max"] == 4


def test_bench_runs_on_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import random

    src = tiny_bert_folder(tmp_path / "src")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(40):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(4)]
        (corpus / f"d{i}.txt").write_text(" ".join(sentences) + "\n")
    out = tmp_path / "results"
    code = main(["bench", "distill_bert", "--model", str(src), "--corpus", str(corpus), "--splats", "4",
                 "--initializers", "pca", "--windows", "0,2", "--pool", "20", "--heldout-fraction", "0.3",
                 "--grid-settings", '{"stage1_steps": 2, "batch_size": 4, "calib_tokens": 200, "max_length": 32}',
                 "--best", '{"key": [4, "pca", 2], "settings": {"stage1_steps": 3}}', "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "distill_bert.json").read_text())
    rows = report["results"]
    assert [(r["initializer"], r["window"], r["budget"]) for r in rows] == [("pca", 0, "grid"), ("pca", 2, "best")]
    assert report["settings"]["passthrough_sanity"]["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 < r["cosine_mean"] <= 1.0 + 1e-9 and 0.0 <= r["nn_agreement"] <= 1.0 for r in rows)
    assert rows[1]["settings"]["stage1_steps"] == 3 and rows[1]["settings"]["window"] == 2
    assert "| 4 | pca | 2 | best |" in capsys.readouterr().out
    assert markdown_table(report) == (out / "distill_bert.md").read_text().rstrip("\n")
