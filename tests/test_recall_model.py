"""The recall cache in a converted GPT-Neo: decode plans, generate() through the recurrent cache, checkpoints."""

from __future__ import annotations

import pytest
import torch
from _adapter_models import batch, gsa_config, logits, positions, tiny_gpt_neo
from gsa_generate import recurrent_cache
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_plugins.adapters import convert, gsa_layers, load_converted
from gsa_plugins.adapters.base import ModelMismatchError

RECALL = {"name": "self-recall", "params": {"budget": 3, "block": 5}}
TOL = 2e-5  # fp32 logits of a 2-layer model, attention blocked differently (as tests/test_generate_cache.py)


def recall_model(glob: str = "gsa", local: str = "exact", recall: dict | None = None, **model_kwargs: object):
    model = tiny_gpt_neo(**model_kwargs)
    extra = {"hybrid_window": 3} if "hybrid" in (glob, local) else {}
    cfg = gsa_config("gpt-neo", backend="kernel", global_layers=glob, local_layers=local, **extra)
    return convert(model, {**cfg, "recall": recall or RECALL})


@torch.no_grad()
def incremental(model, ids, mask, splits):
    cache, outs, start = recurrent_cache(model), [], 0
    pos = positions(mask)
    for end in [*sorted(set(splits)), *range(max(splits) + 1, ids.shape[1] + 1)]:
        outs.append(model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                          cache=cache, use_cache=True).logits)
        start = end
    return torch.cat(outs, dim=1), cache


def real_error(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


@pytest.mark.parametrize("glob, local, kinds", [("gsa", "exact", ["recall", "window"]),
                                                ("hybrid", "hybrid", ["recall", "recall"]),
                                                ("gsa", "gsa", ["recall", "window"])])
def test_layers_that_can_keep_a_cache_decode_with_one(glob, local, kinds):
    model = recall_model(glob, local) if local != "gsa" else convert(tiny_gpt_neo(), {
        **gsa_config("gpt-neo", backend="auto", global_layers=glob, local_layers=local), "recall": RECALL})
    assert [p.kind for p in recurrent_cache(model).plans] == kinds
    assert sum(layer.recall is not None for layer in gsa_layers(model).values()) == kinds.count("recall")


@settings(max_examples=6, deadline=None)
@given(splits=st.lists(st.integers(1, 30), min_size=1, max_size=3), pad=st.integers(0, 6),
       glob=st.sampled_from(["gsa", "hybrid"]))
def test_prefill_and_decode_equal_the_full_forward(splits, pad, glob):
    model = recall_model(glob)
    ids, mask = batch(n=31, left_pad=pad)
    ref = logits(model, ids, mask, position_ids=positions(mask))
    got, cache = incremental(model, ids, mask, splits)
    assert real_error(got, ref, mask) < TOL
    assert cache.constant_size


def test_greedy_generate_matches_recomputation():
    model = recall_model("hybrid", "hybrid")
    ids, mask = batch(n=9, left_pad=3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         return_dict_in_generate=True)
    slow = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          use_cache=False)
    assert [p.kind for p in out.cache.plans] == ["recall", "recall"] and torch.equal(out.sequences, slow)


def test_cache_memory_is_bounded():
    model = recall_model(max_position_embeddings=256)
    ids, mask = batch(n=200, left_pad=0)
    sizes = [incremental(model, ids[:, :n], mask[:, :n], [n - 1])[1].nbytes() for n in (60, 200)]
    assert sizes[0] == sizes[1] > 0  # 60 and 200 are both whole blocks of 5: the same point of the cycle


def test_checkpoints_keep_the_cache(tmp_path):
    model = recall_model()
    model.save_pretrained(tmp_path)
    loaded = load_converted(tmp_path).eval()
    ids, mask = batch(n=14, left_pad=2)
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), rtol=0, atol=0)
    assert loaded.config.gsa["recall"]["name"] == "self-recall"


@pytest.mark.parametrize("layers, message", [([5], r"layer\(s\) \[5\], but the model's layers are \[0, 1\]"),
                                             ([1], r"\[1\], which cannot keep a recall cache")])
def test_recall_layers_must_fit_the_model(layers, message):
    with pytest.raises(ModelMismatchError, match=message):
        recall_model(recall={**RECALL, "layers": layers})


def test_only_the_named_layers_keep_a_cache():
    model = recall_model("hybrid", "hybrid", recall={**RECALL, "layers": [1]})
    assert [p.kind for p in recurrent_cache(model).plans] == ["hybrid", "recall"]
