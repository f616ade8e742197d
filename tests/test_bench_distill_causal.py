"""``gsa bench distill_causal`` end to end on the micro layout (seconds): JSON, table, passthrough sanity."""

from __future__ import annotations

import json

import pytest
from _train_corpus import write_corpus
from gsa_cli.main import main


def test_quick_run_writes_json_and_table(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    args = ["bench", "distill_causal", "--layout", "micro", "--corpus", str(corpus), "--steps", "6",
            "--batch-size", "4", "--block-len", "32", "--splats", "4", "--stage1-steps", "2", "--stage2-steps", "2",
            "--calib-tokens", "200", "--eval-blocks", "8", "--work", str(tmp_path / "work"), "--out",
            str(tmp_path / "out"), "--hybrid"]
    assert main(args) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "distill_causal.json").read_text())
    r = report["results"]
    assert r["passthrough_ppl"] == pytest.approx(r["softmax_ppl"], rel=1e-4)  # GSA off reproduces the original
    assert set(r["converted_ppl"]) == {"calibrated", "stage1", "stage2"}
    assert r["ratio"] == pytest.approx(r["converted_ppl"]["stage2"] / r["softmax_ppl"])
    assert r["target_met"] == (r["ratio"] <= 1.05) and "scratch_gsa_ppl" in r
    assert set(report["phases"]) == {"train_softmax", "distill", "distill_hybrid", "train_gsa_scratch"}
    assert set(r["hybrid"]["converted_ppl"]) == {"calibrated", "stage1", "stage2"}
    assert r["hybrid"]["passthrough_ppl"] == pytest.approx(r["softmax_ppl"], rel=1e-4)
    assert "| hybrid global layers (exact last 8 keys), stage stage2 |" in table
    assert "| converted + stage 2 (full, logit KL) |" in table
    assert (tmp_path / "out" / "distill_causal.md").read_text().strip() == table.strip()
    assert main(["bench", "distill_causal", "--from-json", str(tmp_path / "out" / "distill_causal.json")]) == 0
