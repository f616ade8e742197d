"""A small deterministic text corpus (a folder of .txt files) for the ``gsa train`` tests."""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["The parser", "This function", "The module", "A reader", "The encoder", "Each handler", "The queue"]
VERBS = ["returns", "reads", "writes", "opens", "closes", "decodes", "raises"]
OBJECTS = ["the value", "a new list", "the file object", "an error", "the next token", "a byte string"]
TAILS = ["when the input is empty.", "for every line.", "if the flag is set.", "before the call ends.",
         "from the buffer.", "as a tuple."]


def write_corpus(folder: Path, n_docs: int = 24, sentences: int = 14, seed: int = 0) -> Path:
    """``n_docs`` files of simple docstring-like sentences; the same files for the same arguments."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
                 for _ in range(sentences)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(lines) + "\n")
    return folder


#: Fast settings for the ``micro`` layout (seconds per run).
MICRO = {"layout": "micro", "vocab_size": 300, "batch_size": 4, "block_len": 32, "lr": 3e-3, "warmup_steps": 2,
         "log_every": 1, "eval_blocks": 8, "progress": False}
