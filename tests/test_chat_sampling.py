"""Sampling settings (validation, /set parsing, GenerationConfig) and streamed generation on a tiny model."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from _chat_models import build_chat_model
from gsa_chat.models import ModelLoadError, load_chat_model
from gsa_chat.sampling import SamplingSettings, SettingsError, _StopFilter, fit_context, generate_reply
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory):
    return load_chat_model(build_chat_model(tmp_path_factory.mktemp("chat_model")))


def prompt(chat_model, text: str = "Once upon") -> list[int]:
    tok = chat_model.tokenizer
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]


@given(st.floats(min_value=0, max_value=5))
def test_temperature_in_range_is_accepted(value: float) -> None:
    assert SamplingSettings().with_value("temperature", repr(value)).temperature == value


@given(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=5.000001), st.just(float("nan"))))
def test_temperature_out_of_range_is_refused_naming_the_range(value: float) -> None:
    with pytest.raises(SettingsError, match=r"expected a number from 0 to 5; 0 = greedy. temperature is still 0.8"):
        SamplingSettings().with_value("temperature", repr(value))


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("top_p", "0", "a number in (0, 1]"), ("top_k", "2.5", "a whole number ≥ 0"), ("min_p", "1", "[0, 1)"),
    ("repetition_penalty", "0", "(0, 10]"), ("max_new_tokens", "0", "from 1 to 100000"),
    ("seed", "-1", "or 'none'"), ("temperature", "hot", "from 0 to 5"),
])
def test_bad_values_name_the_valid_range(name: str, text: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=f"bad value for {name}: '{text}'; expected .*{re.escape(expected)}"):
        SamplingSettings().with_value(name, text)


def test_unknown_setting_suggests_and_lists() -> None:
    with pytest.raises(SettingsError, match=r"unknown setting 'temprature'. Did you mean 'temperature'\? Settings: "
                                            r"temperature, top_k"):
        SamplingSettings().with_value("temprature", "1")


def test_text_forms_of_seed_and_stop() -> None:
    s = SamplingSettings().with_value("seed", "7").with_value("stop", r"\n\n")
    assert (s.seed, s.stop) == (7, ["\n\n"])
    s = s.with_value("seed", "none").with_value("stop", '["User:", "###"]')
    assert (s.seed, s.stop, s.display("stop")) == (None, ["User:", "###"], "'User:', '###'")
    assert s.with_value("stop", "none").stop == []


@given(st.text(alphabet=st.characters(blacklist_characters="\\[", blacklist_categories=("Cs",)), min_size=1)
       .filter(lambda s: s.strip() and s.strip().lower() != "none"))
def test_a_stop_string_without_escapes_is_taken_as_is(text: str) -> None:
    assert SamplingSettings().with_value("stop", text).stop == [text.strip()]


def test_generation_config_uses_transformers_knobs(chat_model) -> None:
    tok = chat_model.tokenizer
    config = SamplingSettings(temperature=0.7, top_k=0, top_p=0.9, min_p=0.05, stop=["###"]).generation_config(tok)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p, config.min_p) == (True, 0.7, None,
                                                                                                0.9, 0.05)
    assert config.stop_strings == ["###"] and config.eos_token_id == tok.eos_token_id
    greedy = SamplingSettings(temperature=0, repetition_penalty=1.0).generation_config(tok)
    assert greedy.do_sample is False and greedy.repetition_penalty in (None, 1.0)  # off


def test_seeded_sampling_is_reproducible_and_streams_the_reply(chat_model) -> None:
    settings = SamplingSettings(seed=3, max_new_tokens=20, temperature=1.0)
    pieces: list[str] = []
    first = generate_reply(chat_model.model, chat_model.tokenizer, prompt(chat_model), settings,
                           on_text=pieces.append)
    second = generate_reply(chat_model.model, chat_model.tokenizer, prompt(chat_model), settings)
    other = generate_reply(chat_model.model, chat_model.tokenizer, prompt(chat_model), settings.with_value("seed", "4"))
    assert first.text == second.text and first.text != other.text
    assert "".join(pieces) == first.text and len(pieces) > 1
    assert first.finish_reason in ("stop", "length") and 0 < first.new_tokens <= 20


def test_stop_string_cuts_the_reply_and_the_stream(chat_model) -> None:
    settings = SamplingSettings(seed=3, max_new_tokens=40, temperature=1.0)
    full = generate_reply(chat_model.model, chat_model.tokenizer, prompt(chat_model), settings).text
    stop = full[10:13]
    pieces: list[str] = []
    cut = generate_reply(chat_model.model, chat_model.tokenizer, prompt(chat_model),
                         settings.with_value("stop", stop), on_text=pieces.append)
    assert cut.text == full[:full.find(stop)] and "".join(pieces) == cut.text
    assert cut.finish_reason == "stop" and cut.new_tokens < 40


def test_interrupt_stops_after_the_current_token(chat_model) -> None:
    event = threading.Event()
    event.set()
    reply = generate_reply(chat_model.model, chat_model.tokenizer, prompt(chat_model),
                           SamplingSettings(max_new_tokens=50), interrupt=event)
    assert reply.finish_reason == "interrupted" and reply.new_tokens == 1


@given(st.text(alphabet="abc#", max_size=30), st.lists(st.integers(1, 5), max_size=10))
def test_stop_filter_emits_exactly_the_text_before_the_first_stop(text: str, cuts: list[int]) -> None:
    out: list[str] = []
    filt = _StopFilter(["##", "ca"], out.append)
    pos = 0
    for n in cuts:
        filt.feed(text[pos:pos + n])
        pos += n
    filt.feed(text[pos:], end=True)
    ends = [i for i in (text.find("##"), text.find("ca")) if i >= 0]
    assert "".join(out) == text[:min(ends)] if ends else "".join(out) == text


@given(st.integers(1, 50), st.integers(1, 40), st.integers(2, 64))
def test_fit_context_keeps_the_latest_tokens(n: int, new: int, positions: int) -> None:
    ids, max_new = fit_context(list(range(n)), new, positions)
    assert len(ids) + max_new <= positions and ids == list(range(n))[-len(ids):] and max_new >= 1


def test_missing_folder_and_offline_hub_name_give_clear_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_chat_model(str(tmp_path / "nope"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the value
    with pytest.raises(ModelLoadError, match=r"could not load .* hub model 'no-such-org/no-such-model'.*not a local"):
        load_chat_model("no-such-org/no-such-model")
