"""The serving engine without HTTP: continuous batching equals decoding alone, the prefix cache, limits, cancelling.

The engine is driven step by step (``Engine.step``, no thread), so the tests choose exactly when each request
joins the batch; tokens are compared, never timings.
"""

from __future__ import annotations

import pytest
import torch
from _serve_models import sensitive_gpt_neo
from gsa_chat.sampling import SamplingSettings
from gsa_serve.batch import Batch, prefill, trim_padding
from gsa_serve.engine import Engine, GenerationRequest
from gsa_serve.limits import LimitError, Limits, QueueFullError
from gsa_serve.prefix_cache import PrefixCache
from gsa_serve.runners import KVRunner, SessionPast, UnservableModelError, runner_for
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_plugins.adapters import convert
from gsa_plugins.adapters.past import LayerPast

GSA = {"backend": "kernel", "bank": {"n_splats": 8}, "initializer": "random"}


class LetterTokenizer:
    """Token ids as letters: all the engine needs of a tokenizer (decode, eos, pad)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i in (0, 1, 2)))


def build(kind: str):
    """A model per decode path: GSA state + exact window, GSA state + hybrid window, a recall cache, softmax (KV),
    Llama (KV)."""
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                            initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                                            pad_token_id=0)).eval()
    model = sensitive_gpt_neo()
    if kind == "gsa":
        convert(model, {**GSA, "adapter": {"name": "gpt-neo", "params": {"local_layers": "exact"}}})
    elif kind == "hybrid":
        convert(model, {**GSA, "adapter": {"name": "gpt-neo", "params": {"local_layers": "hybrid",
                                                                         "hybrid_window": 3}}})
    elif kind == "recall":  # a state plus an exact cache of the keys chosen by score
        convert(model, {**GSA, "adapter": {"name": "gpt-neo", "params": {"local_layers": "exact"}},
                        "recall": {"name": "self-recall", "params": {"budget": 3, "block": 5}}})
    return model


KINDS = ("gsa", "hybrid", "recall", "softmax", "llama")


@pytest.fixture(scope="module", params=KINDS)
def runner(request):
    """Every decode path (for the batching tests)."""
    return runner_for(build(request.param))


@pytest.fixture(scope="module", params=("gsa", "softmax"))
def pair(request):
    """A recurrent and a KV path (for the tests of what the engine does around them)."""
    return runner_for(build(request.param))


def greedy(max_new: int) -> SamplingSettings:
    return SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new)


def engine_for(runner, **limits) -> Engine:
    return Engine(runner, LetterTokenizer(), limits=Limits(**{"prefill_chunk": 4, **limits}))


def finish(engine: Engine, jobs, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if all(j.done for j in jobs):
            return
        engine.step()
    raise AssertionError("the engine did not finish its requests")


def alone(runner, prompt: list[int], max_new: int) -> list[int]:
    engine = engine_for(runner)
    job = engine.submit(GenerationRequest(prompt, greedy(max_new), ignore_eos=True), lambda e: None)
    finish(engine, [job])
    return job.generated


def recomputed(model, prompt: list[int], max_new: int) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence at every step (no cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


#: (prompt, max new tokens, the step at which it is submitted): prompts shorter and longer than the window (4)
#: and the prefill chunk (4), sessions joining while others decode and leaving at different steps.
REQUESTS = [([5, 9, 14, 20, 3, 7, 11], 9, 0), ([6], 12, 0), ([30, 31], 5, 2), (list(range(3, 20)), 7, 3),
            ([44, 8, 8, 9, 50], 10, 6), ([12, 13, 14], 4, 9)]


def test_one_request_alone_equals_full_recomputation(runner) -> None:
    prompt, max_new, _ = REQUESTS[3]
    assert alone(runner, prompt, max_new) == recomputed(runner.model, prompt, max_new)


def test_batched_decoding_gives_each_request_the_tokens_it_gets_alone(runner) -> None:
    engine = engine_for(runner)
    jobs, sizes = {}, []
    for step in range(500):
        for i, (prompt, max_new, at) in enumerate(REQUESTS):
            if at == step:
                jobs[i] = engine.submit(GenerationRequest(prompt, greedy(max_new), ignore_eos=True), lambda e: None)
        engine.step()
        sizes.append(len(engine.batch))
        if len(jobs) == len(REQUESTS) and all(j.done for j in jobs.values()):
            break
    peak = sizes.index(max(sizes))
    assert max(sizes) >= 4 and sizes[peak:].count(0) < len(sizes[peak:])  # really batched; rows left one by one
    assert sorted(set(sizes[:peak])) != [max(sizes)]  # sessions joined a running batch
    for i, (prompt, max_new, _) in enumerate(REQUESTS):
        assert jobs[i].generated == alone(runner, prompt, max_new), f"request {i}"


def test_the_test_model_depends_on_its_past(runner) -> None:
    """A batch that mixed up rows' pasts would change tokens: two prompts ending alike decode differently."""
    assert alone(runner, [5, 9, 14, 20, 3, 7], 8) != alone(runner, [40, 41, 42, 43, 3, 7], 8)


def test_left_padded_kept_keys_are_ignored(runner) -> None:
    """A session with fewer kept keys than its neighbour (left-padded when stacked) decodes as alone."""
    short_logits, short = prefill(runner, None, [6])
    _, long = prefill(runner, None, list(range(3, 15)))
    batch = Batch(runner)
    batch.add(long)
    batch.add(short)
    logits = batch.step([7, int(short_logits.argmax())])
    alone_logits, _ = prefill(runner, short, [int(short_logits.argmax())])
    # fp32 logits of a batch of 2 and of 1: the same sums, possibly in another order (a few ulps of O(10) values)
    torch.testing.assert_close(logits[1], alone_logits, rtol=1e-5, atol=1e-4)
    session = batch.session(1)
    assert session.length == 2 and all(p.valid is None or bool(p.valid.all()) for p in session.layers)


def test_trim_padding_drops_only_columns_no_row_uses() -> None:
    keys = torch.arange(2 * 1 * 5 * 2, dtype=torch.float).view(2, 1, 5, 2)
    valid = torch.tensor([[False, False, True, True, True], [False, False, False, True, True]])
    trimmed = trim_padding(LayerPast(keys=keys, values=keys, valid=valid))
    assert torch.equal(trimmed.keys, keys[..., 2:, :]) and torch.equal(trimmed.valid, valid[:, 2:])
    assert trim_padding(LayerPast(state=None)).keys is None


# ----------------------------------------------------------------------------- the prefix cache in the engine
def test_a_follow_up_turn_prefills_only_its_new_tokens(pair) -> None:
    cache = PrefixCache(1 << 26, "model")
    engine = Engine(pair, LetterTokenizer(), limits=Limits(prefill_chunk=4), prefix_cache=cache)
    first = engine.submit(GenerationRequest([5, 9, 14, 20, 3], greedy(6), ignore_eos=True), lambda e: None)
    finish(engine, [first])
    follow_up = [5, 9, 14, 20, 3, *first.generated, 33, 34, 35]
    before = engine.metrics.prefilled_tokens._value.get()
    second = engine.submit(GenerationRequest(follow_up, greedy(6), ignore_eos=True), lambda e: None)
    finish(engine, [second])
    assert second.cached_tokens == 5 + 6 - 1  # the first prompt and every reply token the model was fed
    assert engine.metrics.prefilled_tokens._value.get() - before == len(follow_up) - second.cached_tokens
    assert second.generated == alone(pair, follow_up, 6)
    again = engine.submit(GenerationRequest(follow_up, greedy(6), ignore_eos=True), lambda e: None)
    finish(engine, [again])  # the whole prompt is cached: no forward before the first token
    assert again.cached_tokens == len(follow_up) and again.generated == second.generated


def test_a_cached_state_is_never_changed_by_continuing_it(pair) -> None:
    _, past = prefill(pair, None, [5, 9, 14, 20, 3])
    before = [t.clone() for p in past.layers for t in p.tensors()]
    prefill(pair, past, [7, 8])
    batch = Batch(pair)
    batch.add(past)
    batch.step([7])
    assert all(torch.equal(a, b) for a, b in zip(before, [t for p in past.layers for t in p.tensors()], strict=True))


def entry_past(n: int, nbytes: int = 64) -> SessionPast:
    return SessionPast((LayerPast(keys=torch.zeros(1, 1, nbytes // 8, 2), values=None, valid=None),), n)


def test_prefix_keys_never_give_another_prefix_its_state() -> None:
    cache = PrefixCache(1 << 20, "model-a")
    cache.put([1, 2, 3], entry_past(3), torch.zeros(4))
    assert cache.lookup([1, 2, 3, 4]).ids == (1, 2, 3)
    assert cache.lookup([1, 2, 4, 3]) is None and cache.lookup([1, 2]) is None
    assert cache.key([1, 2, 3]) != PrefixCache(1 << 20, "model-b").key([1, 2, 3])  # another model, another key
    assert cache.hits == 1 and cache.misses == 2


def test_a_hash_collision_still_cannot_hand_out_a_wrong_state(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PrefixCache(1 << 20, "model")
    monkeypatch.setattr(cache, "_digest", lambda data: b"same")  # every prefix collides
    cache.put([1, 2, 3], entry_past(3), torch.zeros(4))
    assert cache.lookup([7, 8, 9, 10]) is None
    assert cache.lookup([1, 2, 3, 10]) is not None


@settings(max_examples=40, deadline=None)
@given(stored=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=5), max_size=6),
       prompt=st.lists(st.integers(0, 3), max_size=7))
def test_lookup_returns_the_longest_stored_prefix(stored: list[list[int]], prompt: list[int]) -> None:
    cache = PrefixCache(1 << 20, "model")
    for ids in stored:
        cache.put(ids, entry_past(len(ids)), torch.zeros(2))
    prefixes = [tuple(ids) for ids in stored if tuple(prompt[:len(ids)]) == tuple(ids)]
    entry = cache.lookup(prompt)
    assert (entry.ids if entry else None) == (max(prefixes, key=len) if prefixes else None)


def test_the_cache_stays_within_its_bytes_evicting_the_least_recently_used() -> None:
    size = entry_past(1).nbytes() + 4 * 4  # the past and a 4-float logits row
    cache = PrefixCache(3 * size, "model")
    for i in range(3):
        cache.put([i], entry_past(1), torch.zeros(4))
    assert cache.lookup([0]) is not None  # 0 is now the most recently used
    cache.put([3], entry_past(1), torch.zeros(4))
    assert cache.nbytes == 3 * size and len(cache) == 3 and cache.evictions == 1
    assert cache.lookup([1]) is None and cache.lookup([0]) is not None and cache.lookup([3]) is not None
    assert not cache.put([9], entry_past(1, nbytes=4 * size), torch.zeros(4))  # larger than the bound: not kept
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes


# ----------------------------------------------------------------------------- slots, queue, limits, cancelling
def test_cancelling_frees_the_slot_before_the_next_step(pair) -> None:
    engine = engine_for(pair, max_sessions=1, max_queue=1)
    events = []
    running = engine.submit(GenerationRequest([5, 6, 7], greedy(100), ignore_eos=True), events.append)
    waiting = engine.submit(GenerationRequest([8, 9], greedy(3), ignore_eos=True), lambda e: None)
    with pytest.raises(QueueFullError, match="1 session slots are busy"):
        engine.submit(GenerationRequest([1], greedy(3)), lambda e: None)
    for _ in range(5):
        engine.step()
    assert engine.counts() == {"queue_depth": 1, "active_sessions": 1, "batch_size": 1}
    running.cancel()
    engine.step()  # the cancelled row leaves, and in the same step the waiting request takes the slot
    assert events[-1].finish_reason == "cancelled" and len(running.generated) < 100
    assert engine.counts()["queue_depth"] == 0 and len(engine.batch) == 1 and waiting.generated
    finish(engine, [waiting])
    assert engine.counts() == {"queue_depth": 0, "active_sessions": 0, "batch_size": 0}
    assert engine.metrics.generations.labels(finish_reason="cancelled")._value.get() == 1


def test_limits_are_checked_before_anything_is_queued() -> None:
    runner = runner_for(build("gsa"))  # 256 positions
    engine = engine_for(runner, max_prompt_tokens=10, max_tokens=50)
    for prompt, max_new, match in [([3] * 11, 5, "at most 10"), ([3] * 5, 51, "at most 50"), ([], 5, "empty")]:
        with pytest.raises(LimitError, match=match):
            engine.submit(GenerationRequest(prompt, greedy(max_new)), lambda e: None)
    wide = engine_for(runner, max_prompt_tokens=300, max_tokens=100)
    with pytest.raises(LimitError, match="maximum context length is 256") as info:
        wide.submit(GenerationRequest([3] * 200, greedy(57)), lambda e: None)
    assert info.value.code == "context_length_exceeded" and engine.counts()["queue_depth"] == 0


def test_a_failed_forward_ends_its_requests_and_the_engine_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = runner_for(build("gsa"))
    engine = engine_for(runner)
    original = runner.forward
    monkeypatch.setattr(runner, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    events = []
    engine.submit(GenerationRequest([5, 6], greedy(3)), events.append)
    engine.step()
    assert events[-1].finish_reason == "error" and "boom" in events[-1].error
    monkeypatch.setattr(runner, "forward", original)
    job = engine.submit(GenerationRequest([5, 6], greedy(3), ignore_eos=True), lambda e: None)
    finish(engine, [job])
    assert len(job.generated) == 3


def test_stop_strings_end_a_request_and_never_show(pair) -> None:
    letters = "".join(LetterTokenizer().decode(alone(pair, [5, 9, 14], 12)))
    stop = letters[4:6]
    engine = engine_for(pair)
    events = []
    job = engine.submit(GenerationRequest([5, 9, 14], greedy(12).model_copy(update={"stop": [stop]}),
                                          ignore_eos=True), events.append)
    finish(engine, [job])
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop" and text == letters[:letters.find(stop)]


def test_a_model_whose_cache_cannot_be_batched_is_refused() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, sliding_window=8))
    with pytest.raises(UnservableModelError, match="DynamicSlidingWindowLayer"):
        KVRunner(model)
