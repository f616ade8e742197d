"""A byte-level BPE tokenizer trained locally with ``tokenizers`` (nothing downloaded).

Why byte-level: every string round-trips (no unknown characters), which a chat over arbitrary user
text needs. The special tokens are set on the returned ``PreTrainedTokenizerFast`` so ``generate()``
stops at ``eos`` and batches can be padded (``pad`` is a token of its own, never confused with ``eos``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
#: Special tokens in id order: ``pad`` is 0, ``eos`` (also ``bos``) is 1, ``unk`` is 2.
SPECIAL_TOKENS = (PAD, EOS, UNK)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    save_to: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for ``transformers``.

    ``bos`` and ``eos`` are the same token (GPT-2 convention), so a document is ``eos text eos`` and
    generation ends where a document would. ``save_to``: also ``save_pretrained`` there.
    Deterministic for the same texts and settings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=model_max_length,
    )
    if save_to is not None:
        wrapped.save_pretrained(Path(save_to))
    return wrapped


__all__ = ["EOS", "PAD", "SPECIAL_TOKENS", "UNK", "train_tokenizer"]
