"""A tiny BERT model folder with a locally built word-level tokenizer, and texts, for the distillation tests."""

from __future__ import annotations

import random
from pathlib import Path

_WORDS = ("the a of and to in is for on with as by it this that be are from or an at which not value list "
          "return string file module object function class method type name error data")
WORDS = tuple(_WORDS.split())


def texts(n: int = 48, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 28))) + "." for _ in range(n)]


def tiny_bert_folder(path: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """``save_pretrained`` of a 2-layer BERT (hidden 32, 4 heads) in ``dtype`` and a ``BertTokenizerFast`` over
    :data:`WORDS`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    # with its pooler, so loading reports nothing missing
    BertModel(config).to(getattr(torch, dtype)).save_pretrained(path)
    return path


def settings(src: Path, out: Path | None = None, **overrides: object) -> dict:
    base = {"source": str(src), "output": None if out is None else str(out), "texts": texts(),
            "heldout_fraction": 0.25, "batch_size": 4, "max_length": 32, "calib_tokens": 300, "stage1_steps": 6,
            "stage1_lr": 0.05, "gsa": {"bank": {"n_splats": 4}, "backend": "auto"}, "progress": False,
            "checkpoint_every": 3}
    base.update(overrides)
    return base
