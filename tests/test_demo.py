"""The README's main job (``gsa demo``) runs end to end on the embedded default."""

from __future__ import annotations

import json

import torch
from gsa_demo.model import CharGSALM, CharLMShape
from gsa_demo.run import default_config_path, run_demo
from rich.console import Console

from gsa_core.config import GSAConfig


def test_embedded_default_config_validates():
    cfg = GSAConfig.from_file(default_config_path())
    assert cfg.bank.n_splats == 32


def test_demo_runs_and_reports(tmp_path):
    result = run_demo(steps=3, length=64, batch=4, out_dir=tmp_path, console=Console(quiet=True))
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["steps"] == 3 and saved["decode_state_bytes"] > 0
    assert saved["kernel_vs_dense_logits_rel_rmse"] <= 1e-4
    assert saved["recurrent_decode_matches_full_forward"] is True
    assert result["heldout_loss"] < 1.5 * result["first_loss"]


def test_recurrent_state_size_does_not_grow():
    torch.manual_seed(0)
    model = CharGSALM(CharLMShape(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_len=128),
                      GSAConfig.from_dict({"bank": {"n_splats": 4}}))
    prompt = torch.randint(0, 20, (1, 5))
    _, bytes_short = model.generate(prompt, 4)
    long, bytes_long = model.generate(prompt, 60)
    assert bytes_short == bytes_long > 0
    reference, _ = model.generate(prompt, 60, recurrent=False)
    assert torch.equal(long, reference)
