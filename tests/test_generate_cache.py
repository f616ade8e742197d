"""The recurrent GSA cache: prefill + decode equals one full forward, generate() uses it, its size is constant."""

from __future__ import annotations

import pytest
import torch
from _adapter_models import batch, gsa_config, logits, positions, tiny_gpt_neo
from gsa_generate import GSARecurrentCache, recurrent_cache, supports_recurrent_cache
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from gsa_plugins.adapters import convert, set_passthrough
from gsa_plugins.adapters.past import CHUNK, DecodePlan

# (backend, global layers, local layers, extra params) -> the cache layer kinds expected
CONFIGS = {
    "gsa-kernel/exact": (("kernel", "gsa", "exact", {}), ["state", "window"]),
    "gsa-dense/gsa-window": (("dense", "gsa", "gsa", {}), ["full", "window"]),  # dense is not recurrent
    "hybrid/hybrid": (("kernel", "hybrid", "hybrid", {"hybrid_window": 3}), ["hybrid", "hybrid"]),
    "exact/exact": (("kernel", "exact", "exact", {}), ["full", "window"]),
    "auto-gsa/hybrid": (("auto", "gsa", "hybrid", {}), ["state", "hybrid"]),
}
TOL = 2e-5


def converted(name: str, **model_kwargs: object):
    (backend, glob, local, extra), _ = CONFIGS[name]
    model = tiny_gpt_neo(**model_kwargs)
    convert(model, gsa_config("gpt-neo", backend=backend, global_layers=glob, local_layers=local, **extra))
    return model


@torch.no_grad()
def incremental(model, ids, mask, splits: list[int], cache=None):
    """Logits of ``ids`` fed in pieces ending at each of ``splits`` (then one token at a time)."""
    pos = positions(mask)
    cache = recurrent_cache(model) if cache is None else cache
    outs, start = [], 0
    ends = sorted(set(splits)) + list(range(max(splits) + 1, ids.shape[1] + 1))
    for end in ends:
        out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                    cache=cache, use_cache=True)
        outs.append(out.logits)
        start = end
    return torch.cat(outs, dim=1), cache


def real_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return ((a - b).abs() * mask[..., None]).max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
    model = converted(name)
    ids, mask = batch(n=24, left_pad=5)
    ref = logits(model, ids, mask, position_ids=positions(mask))
    got, cache = incremental(model, ids, mask, [9])
    assert isinstance(cache, GSARecurrentCache)
    assert [p.kind for p in cache.plans] == CONFIGS[name][1]
    assert real_error(got, ref, mask) < TOL
    assert cache.get_seq_length() == 24


@settings(max_examples=12, deadline=None)
@given(splits=st.lists(st.integers(1, 30), min_size=1, max_size=3), pad=st.integers(0, 6),
       name=st.sampled_from(["gsa-kernel/exact", "hybrid/hybrid"]))
def test_any_split_of_prompt_and_steps_is_exact(splits, pad, name):
    """Multi-token continuations on a non-empty cache (chunked prefill, a new prompt turn) are exact too."""
    model = converted(name)
    ids, mask = batch(n=31, left_pad=pad)
    ref = logits(model, ids, mask, position_ids=positions(mask))
    got, _ = incremental(model, ids, mask, splits)
    assert real_error(got, ref, mask) < TOL


def test_long_input_goes_through_in_pieces():
    """A prompt longer than the layer pieces (CHUNK) with small windows: still one full forward."""
    n = CHUNK + 70
    model = converted("hybrid/hybrid", max_position_embeddings=n + 8, window_size=6)
    ids, mask = batch(n=n, left_pad=9)
    ref = logits(model, ids, mask, position_ids=positions(mask))
    got, _ = incremental(model, ids, mask, [n - 5])
    assert real_error(got, ref, mask) < TOL


def test_greedy_generate_uses_the_cache_and_matches_recomputation():
    model = converted("gsa-kernel/exact")
    ids, mask = batch(n=9, left_pad=3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True)
    assert isinstance(out.cache, GSARecurrentCache)
    # recompute without any cache: one full forward per new token (EOS suppressed, as min_new_tokens does)
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(8):
            step = model(input_ids=seq, attention_mask=m, position_ids=positions(m), use_cache=False).logits[:, -1]
            step[:, model.config.eos_token_id] = float("-inf")
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(out.sequences, seq)


def test_generate_under_inference_mode():
    model = converted("hybrid/hybrid")
    ids, mask = batch(n=9, left_pad=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ref = model.generate(**kw)
    with torch.inference_mode():
        assert torch.equal(model.generate(**kw), ref)


def test_caller_cache_and_opt_out_respected():
    model = converted("gsa-kernel/exact")
    ids, mask = batch(n=9, left_pad=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
              return_dict_in_generate=True)
    ours = model.generate(**kw)
    dyn = model.generate(**kw, cache=DynamicCache(config=model.config))
    assert type(dyn.cache) is DynamicCache and torch.equal(dyn.sequences, ours.sequences)
    opt_out = model.generate(**kw, cache_implementation="dynamic")
    assert type(opt_out.cache) is DynamicCache and torch.equal(opt_out.sequences, ours.sequences)
    mine = recurrent_cache(model)
    assert model.generate(**kw, cache=mine).cache is mine and mine.get_seq_length() == 9 + 4


def test_loaded_checkpoint_generates_with_the_cache(tmp_path):
    from gsa_plugins.adapters import load_converted

    model = converted("gsa-kernel/exact")
    model.save_pretrained(tmp_path)
    loaded = load_converted(tmp_path).eval()
    ids, mask = batch(n=9, left_pad=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
              return_dict_in_generate=True)
    out = loaded.generate(**kw)
    assert isinstance(out.cache, GSARecurrentCache) and torch.equal(out.sequences, model.generate(**kw).sequences)


def test_beam_search_and_sampling_run():
    """Beam search reorders the cache (same beams as with DynamicCache); sampling with several sequences."""
    model = converted("hybrid/hybrid")
    ids, mask = batch(n=7, left_pad=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(**kw), model.generate(**kw, cache_implementation="dynamic"))
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=20,
                         num_return_sequences=2)
    assert out.shape == (4, 11)


def test_cache_size_independent_of_length():
    model = converted("gsa-kernel/exact", max_position_embeddings=256)
    ids, mask = batch(n=200, left_pad=0)
    sizes = {}
    for n in (20, 200):
        _, cache = incremental(model, ids[:, :n], mask[:, :n], [n - 1])
        sizes[n] = cache.nbytes()
    assert cache.constant_size and sizes[20] == sizes[200] > 0
    # every kept key tensor is at most window - 1 long; the GSA layer keeps no keys at all
    state_layer, window_layer = cache.layers
    assert state_layer.keys is None and window_layer.keys.shape[-2] == model.config.window_size - 1
    exact = converted("exact/exact")
    assert not recurrent_cache(exact).constant_size  # a global exact layer keeps every key


def test_gsa_path_does_not_need_the_causal_bias_buffer():
    model = converted("gsa-kernel/exact")
    ids, mask = batch(n=9, left_pad=3)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ref = model.generate(**kw)
    for block in model.transformer.h:  # the n x n buffer the original attention slices its mask from
        block.attn.attention.bias = torch.empty(0, dtype=torch.bool)
    assert torch.equal(model.generate(**kw), ref)


def test_passthrough_through_the_cache_is_the_original_model():
    original = tiny_gpt_neo()
    ids, mask = batch(n=16, left_pad=4)
    ref = logits(original, ids, mask, position_ids=positions(mask))
    model = converted("gsa-kernel/exact")
    set_passthrough(model, True)
    got, cache = incremental(model, ids, mask, [6])
    assert [p.kind for p in cache.plans] == ["full", "window"]
    assert real_error(got, ref, mask) < TOL


def test_errors_are_clear():
    plain = tiny_gpt_neo()
    assert not supports_recurrent_cache(plain)
    with pytest.raises(TypeError, match="converted with the 'gpt-neo' adapter"):
        recurrent_cache(plain)
    model = converted("gsa-kernel/exact")
    ids, mask = batch(n=6, left_pad=0)
    cache = recurrent_cache(model)
    set_passthrough(model, True)
    with pytest.raises(RuntimeError, match="fresh cache"):
        incremental(model, ids, mask, [3], cache=cache)
    with pytest.raises(NotImplementedError, match="PastStore"):
        cache.update(torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), 0)
    with pytest.raises(ValueError, match="valid kinds: state, window, hybrid, full"):
        DecodePlan("sliding")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- any recurrent backend decodes
def _recompute_greedy(model, ids, mask, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens and last-position logits by one full forward per new token (no cache, EOS suppressed)."""
    seq, m, all_logits = ids, mask, []
    with torch.no_grad():
        for _ in range(steps):
            step = model(input_ids=seq, attention_mask=m, position_ids=positions(m), use_cache=False).logits[:, -1]
            step[:, model.config.eos_token_id] = float("-inf")
            all_logits.append(step)
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    return seq, all_logits


def _generate_equals_recomputation(model, kind: str) -> None:
    ids, mask = batch(n=9, left_pad=3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    assert isinstance(out.cache, GSARecurrentCache) and out.cache.plans[0].kind == kind
    seq, ref_logits = _recompute_greedy(model, ids, mask, 8)
    assert torch.equal(out.sequences, seq)
    for got, want in zip(out.logits, ref_logits, strict=True):
        real = torch.isfinite(want)
        # the same fp32 arithmetic in another order (chunked prefill, one-token steps) on logits below 1, whose
        # ulp is 6e-8: a few ulp apart (1.3e-7 seen); TOL (2e-5, ~300 ulp) is the prefill tests' bound above
        assert (got[real] - want[real]).abs().max().item() < TOL


def test_generate_with_an_inexact_sparse_backend_decodes_with_its_own_state():
    """sparse with top_k < alive slots changes the attention; decoding from its own state equals its forward."""
    model = tiny_gpt_neo()
    cfg = gsa_config("gpt-neo", global_layers="gsa", local_layers="exact")
    cfg["backend"] = {"name": "sparse", "params": {"top_k": 3}}  # 8 splats per head
    convert(model, cfg)
    _generate_equals_recomputation(model, "state")


def test_generate_with_a_third_party_recurrent_backend(gsa_registry):
    """A backend registered by a test, sharing no code with kernel or sparse, decodes through the same path."""
    from _recurrent_backends import NaiveRecurrent

    from gsa_core.registry import NoParams

    gsa_registry.register("backend", "naive-recurrent", NaiveRecurrent, NoParams)
    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", backend="naive-recurrent", global_layers="gsa", local_layers="hybrid",
                              hybrid_window=3))
    assert [p.kind for p in recurrent_cache(model).plans] == ["state", "hybrid"]
    _generate_equals_recomputation(model, "state")


def test_a_non_recurrent_backend_keeps_every_key(gsa_registry):
    """A registered backend without the recurrent operations decodes over every kept key (kind full)."""
    from gsa_core.registry import NoParams
    from gsa_plugins.backends.dense import DenseBackend

    class Plain(DenseBackend):
        def __init__(self, params: NoParams) -> None:
            super().__init__()

    gsa_registry.register("backend", "plain", Plain, NoParams)
    model = tiny_gpt_neo()
    convert(model, gsa_config("gpt-neo", backend="plain", global_layers="gsa", local_layers="exact"))
    assert [p.kind for p in recurrent_cache(model).plans] == ["full", "window"]
    _generate_equals_recomputation(model, "full")


# ----------------------------------------------------------------------------- the path of one decode step
LEVELS = (("gsa_generate", 0), ("gsa_plugins.adapters", 1), ("gsa_plugins.backends", 2), ("gsa_core.bank", 3))


def _level(module: str) -> int | None:
    """cache (store) 0 -> layer 1 -> backend 2 -> bank 3; helpers (numerics, masks, transformers) have none."""
    for prefix, level in LEVELS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    return None


def _trace_levels(fn) -> tuple[list[str], set[tuple[int, ...]]]:
    """Run ``fn`` under a profiler: the calls that climb back up, and every chain of levels seen."""
    import sys

    stack: list[int | None] = []
    climbs: list[str] = []
    chains: set[tuple[int, ...]] = set()

    def profile(frame, event, arg):
        if event == "call":
            level = _level(frame.f_globals.get("__name__", ""))
            above = [x for x in stack if x is not None]
            if level is not None and above:
                # the store may be *read and written* by a layer (a leaf accessor), nothing else goes back up
                reading_store = level == 0 and max(above) == 1
                inside_store_from_below = level != 0 and 0 in above and above.index(0) > 0
                if (level < max(above) and not reading_store) or inside_store_from_below:
                    climbs.append(f"{frame.f_code.co_qualname} (level {level}) called under levels {above}")
            stack.append(level)
            chain = tuple(x for x in stack if x is not None)
            chains.add(tuple(x for i, x in enumerate(chain) if i == 0 or x != chain[i - 1]))
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return climbs, chains


@pytest.mark.parametrize("name", ["gsa-kernel/exact", "hybrid/hybrid"])
def test_a_decode_step_descends_cache_layer_backend_bank(name):
    model = converted(name)
    ids, _ = batch(n=9, left_pad=0)
    cache = recurrent_cache(model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        climbs, chains = _trace_levels(lambda: model(input_ids=ids[:, :1], cache=cache, use_cache=True))
    assert not climbs, climbs[:5]
    assert (1, 2, 3) in chains  # layer -> backend -> bank was taken (the state's extend, the layer's own backend)
