"""``gsa_distill``: settings and regulariser errors, stage 1 on the teacher tap, determinism, resume, LoRA stage 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _distill_models import settings, tiny_bert_folder
from gsa_distill import REGULARISERS, DistillSettings, check_regularisers, distill, embedding_agreement
from gsa_distill.engine import batch_order
from gsa_distill.regularisers import amplitude_l1, overlap

from gsa_core.bank import SplatBank
from gsa_core.errors import ConfigError, GSAError
from gsa_plugins.adapters import banks, load_converted

QUIET = {"log": lambda msg: None}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert"))


def bank_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t.clone() for n, b in banks(model).items() for k, t in b.state_dict().items()}


# ----------------------------------------------------------------------------- settings and regularisers
def test_regulariser_registry_errors_list_the_names() -> None:
    with pytest.raises(ValueError, match=r"unknown regulariser 'overlapp'. Did you mean 'overlap'\? Available "
                                         r"regularisers: amplitude-l1, overlap"):
        check_regularisers({"overlapp": 1.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        check_regularisers({"overlap": -1.0})
    with pytest.raises(ConfigError, match="regularisers"):
        DistillSettings.build(source="x", regularisers={"sparsity": 0.1})
    assert set(REGULARISERS) == {"overlap", "amplitude-l1"}


def test_settings_errors_name_the_field_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"stage2.*'none', 'lora' or 'full'"):
        DistillSettings.build(source="x", stage2="qlora")
    with pytest.raises(GSAError, match="kmeans"):
        DistillSettings.build(source="x", initializer="kmean")
    with pytest.raises(ConfigError, match="n_splats"):
        DistillSettings.build(source="x", gsa={"bank": {"n_splats": 0}})
    s = DistillSettings.build(source="x")
    assert (s.initializer, s.initializer_params) == ("kmeans", {"scale_factor": 4.0})
    assert DistillSettings.build(source="x", initializer="pca").initializer_params == {}


def test_overlap_is_one_for_identical_splats_and_small_for_distant_ones() -> None:
    bank = SplatBank(1, 3, 2)
    with torch.no_grad():
        bank.centers.zero_()
    assert float(overlap(bank).detach()) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        bank.centers[0, 1] = 20.0
    assert float(overlap(bank).detach()) < 1e-6
    with torch.no_grad():
        bank.log_amplitude.copy_(torch.tensor([[0.0, 2.0]]))
    assert float(amplitude_l1(bank).detach()) == pytest.approx((1 + torch.e**2) / 2, rel=1e-6)
    bank.alive[0, 1] = False
    assert float(amplitude_l1(bank).detach()) == pytest.approx(1.0) and float(overlap(bank).detach()) == 0.0


def test_embedding_agreement_definitions() -> None:
    a = torch.eye(4) + 0.1
    out = embedding_agreement(a, a * 3)
    assert out["cosine_mean"] == pytest.approx(1.0) and out["nn_agreement"] == 1.0
    swapped = a[[1, 0, 2, 3]]
    assert embedding_agreement(a, swapped)["cosine_mean"] < 0.99
    with pytest.raises(ValueError, match="one shape"):
        embedding_agreement(a, a[:3])


def test_batch_order_is_a_permutation_per_epoch() -> None:
    for epoch in range(3):
        assert sorted(batch_order(5, epoch * 5 + i, 0) for i in range(5)) == list(range(5))


# ----------------------------------------------------------------------------- runs
def test_stage1_reduces_the_layer_error_and_only_trains_splats(src: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    run = distill(settings(src, tmp_path / "out", stage1_steps=12), **QUIET)
    errors = run.report["layer_error"]
    for name in errors["calibrated"]:
        assert errors["stage1"][name]["mse"] < errors["calibrated"][name]["mse"]
    history = run.report["stage1"]["history"]
    assert history[-1]["rel_mse"] < history[0]["rel_mse"]
    original = AutoModel.from_pretrained(src)
    own = dict(run.model.named_parameters())
    for name, p in original.named_parameters():  # host weights untouched
        assert torch.equal(own[name], p), name
    report = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert report["finished"] and report["schema"] == "gsa-distill/1"
    again = load_converted(tmp_path / "out" / "model")
    for name, t in bank_tensors(run.model).items():
        assert torch.equal(bank_tensors(again)[name], t)


def test_same_seed_same_result_and_other_seed_differs(src: Path) -> None:
    a = bank_tensors(distill(settings(src, regularisers={"overlap": 0.1}), **QUIET).model)
    b = bank_tensors(distill(settings(src, regularisers={"overlap": 0.1}), **QUIET).model)
    c = bank_tensors(distill(settings(src, seed=1), **QUIET).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_equals_uninterrupted(src: Path, tmp_path: Path) -> None:
    common = {"stage2": "lora", "stage2_steps": 4, "checkpoint_every": 2,
              "gsa": {"bank": {"n_splats": 4}, "backend": "auto",
                      "adaptation": {"enabled": True, "scheduler": {"name": "interval",
                                                                    "params": {"start": 2, "every": 2}}}}}
    whole = distill(settings(src, tmp_path / "whole", **common), **QUIET)
    part = distill(settings(src, tmp_path / "part", **common), stop_after_steps=4, **QUIET)  # stops in stage 1
    assert not part.report["finished"] and not (tmp_path / "part" / "model").exists()
    part2 = distill(settings(src, tmp_path / "part", resume=True, **common), stop_after_steps=4, **QUIET)
    assert not part2.report["finished"]  # 2 steps of stage 1, then 2 of stage 2
    done = distill(settings(src, tmp_path / "part", resume=True, **common), **QUIET)
    assert done.report["finished"]
    a, b = whole.model.state_dict(), done.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert done.report["stage2"]["history"] == whole.report["stage2"]["history"]


def test_lora_stage2_trains_only_lora_and_splats_and_reloads(src: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    run = distill(settings(src, tmp_path / "out", stage2="lora", stage2_steps=4, stage2_lr=1e-2), **QUIET)
    s2 = run.report["stage2"]
    # LoRA on query/key/value of 2 layers: rank 8 x (32 + 32) per matrix
    assert s2["trainable_host_params"] == 2 * 3 * 8 * (32 + 32)
    original = dict(AutoModel.from_pretrained(src).named_parameters())
    changed = [n for n, p in run.model.named_parameters() if ".bank." not in n and n in original
               and not torch.equal(p, original[n])]
    assert changed and all(n.rsplit(".", 2)[-2] in ("query", "key", "value") for n in changed)  # merged LoRA only
    assert not any("lora" in n for n, _ in run.model.named_parameters())
    again = load_converted(tmp_path / "out" / "model").eval()
    ids = torch.tensor([[2, 8, 9, 10, 3, 0], [2, 11, 12, 13, 14, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   run.model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   rtol=0, atol=0)


def test_task_loss_must_fit_the_model(src: Path) -> None:
    with pytest.raises(ValueError, match="needs a causal LM"):
        distill(settings(src, stage1_steps=1, stage2="full", stage2_steps=1, task_loss="next-token"), **QUIET)


@pytest.mark.parametrize("task_loss", ["logit-kl", "next-token"])
def test_causal_lm_stage2_losses(src: Path, task_loss: str) -> None:
    from _adapter_models import tiny_gpt_neo
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)  # any tokenizer whose ids fit the tiny vocabulary
    model = tiny_gpt_neo()
    run = distill(settings(src, stage1_steps=3, stage2="full", stage2_steps=3, stage2_lr=1e-3, task_loss=task_loss,
                           gsa={"bank": {"n_splats": 4}, "backend": "auto",
                                "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa"}}}),
                  model=model, tokenizer=tokenizer, **QUIET)
    s2 = run.report["stage2"]
    assert s2["task_loss"] == task_loss and len(s2["history"]) == 2
    losses = [h["loss"] for h in s2["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and (task_loss == "next-token" or losses[0] >= 0.0)
    assert "embedding" not in run.report  # encoders only
