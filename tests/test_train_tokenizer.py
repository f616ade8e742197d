"""The locally trained byte-level BPE tokenizer: round trip, special tokens, save/reload."""

from __future__ import annotations

import pytest
from gsa_train.tokenizer import EOS, PAD, train_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

TEXTS = ["Return the value of the named attribute of object.", "Open file and return a stream.",
         "Raise ValueError if the value is not found."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320, min_frequency=1)


@given(text=st.text(max_size=60))
@settings(max_examples=60, deadline=None)
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_special_tokens_are_set_and_distinct(tok):
    assert tok.pad_token == PAD and tok.eos_token == EOS and tok.bos_token == EOS
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    assert len(tok) <= 320
    assert tok.convert_ids_to_tokens(tok(EOS)["input_ids"]) == [EOS]  # one token, not its characters
    batch = tok(["a", "Return the value"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_frequent_words_become_single_tokens(tok):
    assert len(tok("Return the value")["input_ids"]) < len("Return the value") / 2


def test_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(TEXTS, vocab_size=300, save_to=tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Open the file ☃"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (0, 1, 1)


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 259"):
        train_tokenizer(TEXTS, vocab_size=100)
