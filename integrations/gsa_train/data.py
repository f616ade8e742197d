"""Corpus → train/held-out texts → tokenized, packed blocks; the batch of every step.

Why a pure function of ``(seed, step)`` for batches: a resumed run and an uninterrupted one read
exactly the same rows without saving any sampler state, and every rank of a data-parallel run
derives the same global batch (then takes its own shard).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gsa_data import Document, corpus_problem, load_corpus, pack_passages, split_documents
from torch import Tensor

from gsa_core.errors import ConfigError

HF_PREFIX = "hf:"
CORPUS_HELP = "stdlib (Python's docstrings and pydoc topics, the default), a folder of .txt files, or hf:NAME"


@dataclass(frozen=True)
class TextSplit:
    """Passages of the training and held-out documents (split by document, never by passage)."""

    source: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    n_documents: int


def _hf_documents(name: str) -> list[Document]:
    """Rows of a Hugging Face dataset's ``train`` split with a ``text`` column (needs ``datasets``)."""
    dataset, _, split = name.partition(":")
    try:
        import datasets
    except ModuleNotFoundError:
        raise ConfigError(f"corpus 'hf:{name}' needs the 'datasets' package (pip install datasets); "
                         f"offline corpora: {CORPUS_HELP}") from None
    try:
        rows = datasets.load_dataset(dataset, split=split or "train")
    except Exception as exc:  # unreachable hub, unknown name, no network: one clear message
        raise ConfigError(f"could not load Hugging Face dataset {dataset!r}: {type(exc).__name__}: {exc}. "
                         f"Offline corpora: {CORPUS_HELP}") from None
    if "text" not in rows.column_names:
        raise ConfigError(f"dataset {dataset!r} has no 'text' column (columns: {', '.join(rows.column_names)})")
    return [Document(f"hf:{dataset}:{i}", str(t)) for i, t in enumerate(rows["text"]) if str(t).strip()]


def documents(source: str | os.PathLike[str] = "stdlib") -> list[Document]:
    """The documents of ``source``: ``stdlib``, a folder of text files, or ``hf:NAME[:SPLIT]``."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        return _hf_documents(text[len(HF_PREFIX):])
    check_corpus(text)
    try:
        docs = load_corpus(source)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot read corpus {text!r}: {exc}") from None
    if not docs:
        raise ConfigError(f"corpus {text!r} has no text (a folder needs non-empty .txt files)")
    return docs


def check_corpus(source: str) -> str:
    """``source`` if it names a corpus (``hf:NAME``, a built-in name, a folder), else a :class:`ConfigError`."""
    if not source.startswith(HF_PREFIX) and corpus_problem(source) is not None:
        raise ConfigError(f"{corpus_problem(source)}; corpora: {CORPUS_HELP}")
    return source


def load_texts(source: str | os.PathLike[str] = "stdlib", *, heldout_fraction: float = 0.1,
               max_chars: int = 2000, min_chars: int = 20) -> TextSplit:
    """Split ``source`` by document (deterministic, :func:`gsa_data.split_documents`), then cut passages."""
    docs = documents(source)
    split = split_documents(docs, heldout_fraction)
    texts = TextSplit(
        source=str(Path(source)) if not str(source).startswith(HF_PREFIX) and Path(source).is_dir() else str(source),
        train=tuple(pack_passages(split.train, max_chars=max_chars, min_chars=min_chars)),
        heldout=tuple(pack_passages(split.heldout, max_chars=max_chars, min_chars=min_chars)),
        n_documents=len(docs),
    )
    if not texts.train or not texts.heldout:
        raise ConfigError(f"corpus {str(source)!r} is too small: {len(docs)} document(s) give {len(texts.train)} "
                          f"training and {len(texts.heldout)} held-out passages of {min_chars}+ characters; training "
                          "needs at least two documents (one is held out)")
    return texts


def encode_blocks(tokenizer: Any, texts: tuple[str, ...] | list[str], block_len: int) -> Tensor:
    """``[N, block_len]`` token ids: every passage preceded by ``eos``, concatenated, cut into full blocks.

    The tail shorter than a block is dropped, so every row has the same number of loss terms (which
    makes data-parallel gradient averaging exact).
    """
    if block_len < 2:
        raise ConfigError(f"block_len must be >= 2, got {block_len}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        stream.append(eos)
        stream.extend(ids)
    n = len(stream) // block_len
    return torch.tensor(stream[: n * block_len], dtype=torch.long).view(n, block_len)


def batch_rows(n_blocks: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Row indices of the global batch of ``step``: epochs are seeded permutations, read in order."""
    if n_blocks < 1:
        raise ConfigError("no training blocks: the corpus is smaller than one block; use a shorter --block-len")
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_blocks)
        seeded = torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**63)  # any seed, any epoch fits
        perm = torch.randperm(n_blocks, generator=seeded)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


__all__ = ["CORPUS_HELP", "TextSplit", "batch_rows", "check_corpus", "documents", "encode_blocks", "load_texts"]
