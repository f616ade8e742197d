"""Layouts by name; corpus → blocks is deterministic, the split is by document, batches are permutations."""

from __future__ import annotations

import pytest
import torch
from _train_corpus import write_corpus
from gsa_train.data import batch_rows, encode_blocks, load_texts
from gsa_train.layouts import LAYOUTS, gpt_neo_config, layout
from gsa_train.tokenizer import train_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.errors import ConfigError


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_alternate_global_and_local(name):
    config = gpt_neo_config(name, vocab_size=500)
    lay = layout(name)
    assert config.vocab_size == 500 and config.hidden_size == lay.hidden_size
    assert config.attention_layers == ["global", "local"] * (lay.num_layers // 2)
    assert config._attn_implementation == "eager" and config.pad_token_id == 0 and config.eos_token_id == 1


def test_tinystories_layout_is_the_real_shape():
    c = gpt_neo_config("tinystories-33m")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.window_size, c.vocab_size, c.max_position_embeddings) == (
        768, 4, 16, 256, 50257, 2048)


def test_unknown_layout_lists_the_names():
    with pytest.raises(ConfigError, match="available layouts: tinystories-33m, reference, tiny"):
        layout("huge")


def test_texts_are_deterministic_and_split_by_document(tmp_path):
    folder = write_corpus(tmp_path / "c")
    a, b = load_texts(folder), load_texts(folder)
    assert a == b and a.n_documents == 24
    assert a.train and a.heldout and not set(a.train) & set(a.heldout)
    # adding a document never moves the others across the split
    (folder / "zz_extra.txt").write_text("A brand new document that returns the value. " * 5)
    c = load_texts(folder)
    assert set(a.heldout) <= set(c.heldout) and set(a.train) <= set(c.train)


def test_unknown_corpus_and_missing_datasets_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown corpus 'nope'.*stdlib"):
        load_texts("nope")
    with pytest.raises(ConfigError, match="has no text"):
        load_texts(tmp_path)
    try:
        import datasets  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ConfigError, match="needs the 'datasets' package"):
            load_texts("hf:roneneldan/TinyStories")


def test_blocks_are_full_rows_of_the_eos_separated_stream(tmp_path):
    texts = load_texts(write_corpus(tmp_path / "c"))
    tok = train_tokenizer(texts.train, 300)
    blocks = encode_blocks(tok, texts.train, 16)
    stream = []
    for t in texts.train:
        stream += [tok.eos_token_id, *tok(t)["input_ids"]]
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert torch.equal(blocks, encode_blocks(tok, texts.train, 16))


@given(n=st.integers(1, 30), batch=st.integers(1, 8), seed=st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_batches_read_each_epoch_as_a_permutation(n, batch, seed):
    rows = torch.cat([batch_rows(n, batch, step, seed) for step in range(n)])  # n batches = `batch` epochs
    assert rows.shape == (n * batch,)
    for epoch in rows.view(batch, n):
        assert sorted(epoch.tolist()) == list(range(n))
    assert torch.equal(batch_rows(n, batch, 3, seed), batch_rows(n, batch, 3, seed))
