"""No quadratic memory on the GSA path: no n x n buffers, chunked prefill, linear-memory training forwards."""

from __future__ import annotations

import warnings

import pytest
import torch
from _adapter_models import batch, logits, tiny_gpt_neo
from _long_context import LargestTensor, converted
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.masks import MaskSpec
from gsa_plugins.adapters import load_converted
from gsa_plugins.adapters.long_inputs import LongContextWarning, banded_attention, set_prefill_chunk
from gsa_plugins.adapters.positions import extend_positions

MODES = {"gsa": {}, "hybrid": {"local_layers": "hybrid"}, "passthrough": {"passthrough": True},
         "exact-global": {"global_layers": "exact"}}
# Two float32 summation orders (one pass vs pieces, blocked vs whole-row softmax) of O(1) logits: a few ulps.
RTOL, ATOL = 1e-5, 1e-5


def buffer_bytes(model: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


# ----------------------------------------------------------------------------- no n x n buffers
def test_a_converted_model_holds_no_buffer_sized_by_its_positions():
    from gsa_plugins.adapters import convert

    sizes = {}
    for positions in (64, 512):
        original = tiny_gpt_neo(max_position_embeddings=positions)
        assert buffer_bytes(original) >= 2 * positions**2  # GPT-Neo's own: a bool P x P bias per layer
        sizes[positions] = buffer_bytes(convert(original, {"bank": {"n_splats": 8}, "adapter": {"name": "gpt-neo"}}))
    assert sizes[64] == sizes[512]


def test_building_and_loading_allocate_no_n_by_n_tensor(tmp_path):
    """At 8,192 positions one GPT-Neo ``bias`` is 64 MiB; nothing of that order is made, not even for a moment."""
    from transformers import GPTNeoForCausalLM

    model = converted()
    extend_positions(model, 8192, "tile")
    model.save_pretrained(tmp_path / "gsa")
    table = model.transformer.wpe.weight
    table_bytes = table.numel() * table.element_size()  # 8192 x 32 floats: the largest thing the model holds
    with LargestTensor() as load:
        again = load_converted(tmp_path / "gsa")
    with LargestTensor() as build:
        type(again)(again.config)
    assert load.bytes <= table_bytes and build.bytes <= table_bytes, (load.op, build.op)
    # the probe sees GPT-Neo's own buffer where there is one (the same loader on the original class)
    tiny_gpt_neo(max_position_embeddings=4096).save_pretrained(tmp_path / "original")
    with LargestTensor() as original:
        GPTNeoForCausalLM.from_pretrained(tmp_path / "original")
    assert original.bytes >= 4096**2


@pytest.mark.parametrize("left_pad", [0, 3])
def test_passthrough_is_still_the_original_bit_for_bit(tmp_path, left_pad):
    ids, mask = batch(n=20, left_pad=left_pad)
    reference = logits(tiny_gpt_neo(), ids, mask)
    model = converted(passthrough=True)
    assert torch.equal(logits(model, ids, mask), reference)
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    assert torch.equal(logits(again, ids, mask), reference)
    original = tiny_gpt_neo()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="dynamic")
    assert torch.equal(again.generate(input_ids=ids, attention_mask=mask, **kwargs),
                       original.generate(input_ids=ids, attention_mask=mask, **kwargs))


# ----------------------------------------------------------------------------- chunked prefill
@pytest.mark.parametrize("mode", list(MODES))
def test_a_long_forward_is_prefilled_in_chunks_and_equals_one_pass(mode):
    model = converted(**MODES[mode])
    ids, mask = batch(n=50, left_pad=5)
    real = mask.bool()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", LongContextWarning)
        set_prefill_chunk(model, 0)  # one pass: the model's own masks
        whole = model(input_ids=ids, attention_mask=mask)
        set_prefill_chunk(model, 16)  # 4 pieces through the recurrent cache
        pieces = model(input_ids=ids, attention_mask=mask)
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=3)
        chosen = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor([7, 20, 49]))
    assert type(pieces.cache).__name__ == "GSARecurrentCache" and pieces.cache.get_seq_length() == 50
    torch.testing.assert_close(pieces.logits[real], whole.logits[real], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(kept.logits, whole.logits[:, -3:], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(chosen.logits[1], whole.logits[1, [7, 20, 49]], rtol=RTOL, atol=ATOL)


def test_a_chunked_loss_is_the_one_pass_loss():
    model = converted()
    ids, _ = batch(n=50, left_pad=0)
    labels = ids.clone()
    labels[:, :10] = -100
    with torch.no_grad():
        set_prefill_chunk(model, 0)
        whole = model(input_ids=ids, labels=labels).loss
        set_prefill_chunk(model, 16)
        pieces = model(input_ids=ids, labels=labels, use_cache=False)
    assert pieces.cache is None
    torch.testing.assert_close(pieces.loss, whole, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["gsa", "hybrid"])
def test_generate_prefills_in_chunks_with_the_same_tokens(mode):
    model = converted(**MODES[mode])
    ids, mask = batch(n=40, left_pad=4)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    set_prefill_chunk(model, 0)
    whole = model.generate(**kwargs)
    set_prefill_chunk(model, 8)
    assert torch.equal(model.generate(**kwargs), whole)


def test_a_long_prefill_makes_no_n_by_n_tensor():
    model = converted()
    extend_positions(model, 1024, "tile")
    set_prefill_chunk(model, 64)
    largest = {}
    for n in (512, 1024):
        ids = torch.randint(3, 101, (1, n))
        with torch.no_grad(), LargestTensor() as probe:
            model(input_ids=ids, logits_to_keep=1)
        largest[n] = probe.bytes, probe.op
    # at most linear (ids, positions): a quadratic term would be 4x
    assert largest[1024][0] <= 2 * largest[512][0], largest
    assert largest[1024][0] < 1024**2 // 4, largest  # far below one n x n bool mask


def test_cache_nbytes_grows_only_with_layers_that_keep_every_key():
    sizes = {}
    for mode in ("gsa", "exact-global"):
        model = converted(**MODES[mode])
        set_prefill_chunk(model, 16)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sizes[mode] = [model(input_ids=torch.randint(3, 101, (1, n))).cache.nbytes() for n in (32, 60)]
        assert any(issubclass(w.category, LongContextWarning) for w in caught) == (mode == "exact-global")
    assert sizes["gsa"][0] == sizes["gsa"][1]  # a kernel state and a window: constant
    assert sizes["exact-global"][1] > sizes["exact-global"][0]  # an exact global layer keeps every key


# ----------------------------------------------------------------------------- training forwards
def _train_step(model, ids):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_long_training_forward_equals_the_short_path_and_its_gradients():
    model = converted()
    ids = torch.randint(3, 101, (2, 60))
    set_prefill_chunk(model, 0)
    short, short_grads = _train_step(model, ids)
    set_prefill_chunk(model, 16)  # 60 > 16: padding rows, kernel GSA, banded exact window
    long, long_grads = _train_step(model, ids)
    torch.testing.assert_close(long.logits, short.logits, rtol=RTOL, atol=ATOL)
    assert short_grads.keys() == long_grads.keys()
    for name, grad in short_grads.items():  # gradients of sums of O(1) terms: the same few-ulp rounding, scaled
        torch.testing.assert_close(long_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_long_training_step_is_linear_in_memory():
    model = converted()
    extend_positions(model, 2048, "interpolate")
    set_prefill_chunk(model, 32)
    largest = {}
    for n in (512, 1024):
        ids = torch.randint(3, 101, (1, n))
        with LargestTensor() as probe:
            _train_step(model, ids)
        largest[n] = probe.bytes
    assert largest[1024] <= 2 * largest[512], largest  # quadratic would be 4x
    assert largest[1024] < 4 * 1024**2 // 2  # below half of one n x n float mask (GPT-Neo's eager mask)


# ----------------------------------------------------------------------------- banded exact attention
@settings(max_examples=20, deadline=None, derandomize=True)
@given(n_q=st.integers(1, 30), extra=st.integers(0, 12), window=st.one_of(st.none(), st.integers(1, 12)),
       block=st.integers(1, 12), pad=st.integers(0, 5), seed=st.integers(0, 1000))
def test_banded_attention_is_exact_windowed_softmax(n_q, extra, window, block, pad, seed):
    g = torch.Generator().manual_seed(seed)
    n_k = n_q + extra
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for n in (n_q, n_k, n_k))
    valid = torch.ones(2, n_k, dtype=torch.bool)
    valid[0, :min(pad, n_k)] = False
    spec = MaskSpec(causal=True, window=window, key_padding=valid)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~spec.allowed(n_q, n_k), float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row that sees nothing: zeros
    out = banded_attention(q, k, v, valid, window=window, block=block)
    torch.testing.assert_close(out, probs @ v, rtol=1e-12, atol=1e-12)  # float64, two summation orders


def test_a_padded_long_training_forward_reads_the_padding_row():
    """Training (gradients on) a long left-padded batch: one forward with a [B, 1, 1, n] padding row, read as
    key padding by every converted module (GSA, passthrough exact, banded local window)."""
    real_rows = {}
    for mode in ("gsa", "passthrough"):
        model = converted(**MODES[mode])
        ids, mask = batch(n=40, left_pad=6)
        real = mask.bool()
        model.train()
        set_prefill_chunk(model, 0)
        whole = model(input_ids=ids, attention_mask=mask).logits
        set_prefill_chunk(model, 8)
        rows = model(input_ids=ids, attention_mask=mask).logits
        assert rows.requires_grad
        torch.testing.assert_close(rows[real], whole[real], rtol=RTOL, atol=ATOL)
        real_rows[mode] = rows[real]
    assert not torch.allclose(real_rows["gsa"], real_rows["passthrough"])  # the two modes did differ
