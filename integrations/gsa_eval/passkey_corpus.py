"""``gsa eval passkey-corpus``: the fine-tuning corpus of the passkey recipe, for ``gsa train``.

Why exact lengths: ``gsa train`` puts an eos before every document and cuts the stream into rows of
``--block-len`` tokens, so documents of exactly ``block_len - 1`` tokens (with the tokenizer training
will use) make every row one whole example: its key, its filler and its question, never the tail of
another example's needle. Writes ``OUT/texts/NNNNN.txt`` (one example each), ``OUT/tokenizer/`` (a byte-level
BPE trained on draft examples, unless ``--tokenizer`` gives one) and ``OUT/corpus.json``; then::

    gsa train --corpus OUT/texts --tokenizer OUT/tokenizer --block-len N ...
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
from pathlib import Path
from typing import Any

from gsa_common import check_range

from gsa_core.errors import ConfigError
from gsa_eval.passkey_task import MAX_KEY_DIGITS, PasskeyFormat, random_key

#: Examples drawn (at a rough length) to train the tokenizer on when none is given.
DRAFTS = 400
#: Most examples one corpus holds.
MAX_EXAMPLES = 1_000_000
#: Most question-answer pairs per example.
MAX_QUESTIONS = 100
#: The trained tokenizer's ``model_max_length``: evaluation prompts are many times the fine-tuning context.
MAX_TOKENS = 1 << 20


def passage_chars() -> int:
    """Characters beyond which ``gsa train`` cuts a document into several passages (its ``load_texts`` default)."""
    from gsa_train.data import load_texts

    return int(inspect.signature(load_texts).parameters["max_chars"].default)


def draft_texts(count: int, context: int, digits: int, seed: int) -> list[str]:
    """Examples of about ``context`` tokens at ~4 characters a token, to train a tokenizer on."""
    from gsa_eval.passkey_task import FILLER, INTRO, NEEDLE, QUESTION

    rng = random.Random(f"passkey-drafts:{seed}")
    texts = []
    for _ in range(count):
        key, filler = random_key(rng, digits), [rng.choice(FILLER) for _ in range(max(1, context // 5))]
        cut = rng.randrange(len(filler) + 1)
        texts.append(" ".join([INTRO, *filler[:cut], NEEDLE.format(key=key), *filler[cut:], QUESTION]) + f" {key}.")
    return texts


def write_corpus(out: Path, *, context: int, examples: int, digits: int, seed: int, tokenizer_dir: Path | None,
                 vocab_size: int, questions: int = 1) -> dict[str, Any]:
    """Write the corpus (see the module docstring); returns what ``corpus.json`` records."""
    from gsa_train.tokenizer import train_tokenizer

    from gsa_plugins.adapters.hf import load_tokenizer

    if tokenizer_dir is None:
        tokenizer = train_tokenizer(draft_texts(DRAFTS, context, digits, seed), vocab_size,
                                    model_max_length=MAX_TOKENS, save_to=out / "tokenizer")
        tokenizer_path = out / "tokenizer"
    else:
        tokenizer, tokenizer_path = load_tokenizer(tokenizer_dir), tokenizer_dir
    fmt = PasskeyFormat(tokenizer)
    texts = out / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"passkey-corpus:{seed}")
    limit, longest = passage_chars(), 0
    for i in range(examples):
        # its eos is the one gsa train puts before every document
        example = fmt.example(context, rng.random(), random_key(rng, digits), rng, questions=questions)
        text = example.text(tokenizer)
        if fmt.count(text) != context - 1:
            raise ConfigError(f"this tokenizer cannot make passkey examples of exactly {context - 1} tokens (the "
                              "filler has no one-token word); give another --tokenizer or another --context")
        longest = max(longest, len(text))
        if longest > limit:
            raise ConfigError(f"--context {context} makes examples of {longest} characters; gsa train cuts documents "
                              f"longer than {limit} characters into passages: use a shorter --context")
        (texts / f"{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
    record = {"schema": "gsa-eval-passkey-corpus/1", "context": context, "examples": examples, "key_digits": digits,
              "questions": questions, "seed": seed, "tokenizer": str(tokenizer_path), "longest_chars": longest,
              "train": f"gsa train --corpus {texts} --tokenizer {tokenizer_path} --block-len {context}"}
    (out / "corpus.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="folder for texts/, tokenizer/ and corpus.json (must be empty or new)")
    parser.add_argument("--context", type=int, default=256, help="tokens per example, the answer and gsa train's eos "
                        "included (default 256): the fine-tuning context")
    parser.add_argument("--examples", type=int, default=2000, help="examples to write (default 2000)")
    parser.add_argument("--key-digits", type=int, default=2, help="digits of each key (default 2)")
    parser.add_argument("--questions", type=int, default=3, help="question-answer pairs per example, the last at "
                        "the end (default 3: retrieval practised over several distances)")
    parser.add_argument("--tokenizer", type=Path, help="a saved tokenizer to use (default: train one on the format)")
    parser.add_argument("--vocab-size", type=int, default=512, help="vocabulary of the trained tokenizer (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT, replacing its files")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gsa_data.files import check_destination

    check_range("--key-digits", args.key_digits, 1, MAX_KEY_DIGITS)
    check_range("--examples", args.examples, 1, MAX_EXAMPLES)
    check_range("--questions", args.questions, 1, MAX_QUESTIONS)
    if args.context < 2:
        raise ConfigError(f"--context must be at least 2 tokens, got {args.context}")
    if args.vocab_size < 259:
        raise ConfigError(f"--vocab-size must be at least 259 (specials and 256 bytes), got {args.vocab_size}")
    check_destination(args.out, sources=[p for p in (args.tokenizer,) if p is not None], force=args.force,
                      resume=False, flag="OUT")
    record = write_corpus(args.out, context=args.context, examples=args.examples, digits=args.key_digits,
                          seed=args.seed, tokenizer_dir=args.tokenizer, vocab_size=args.vocab_size,
                          questions=args.questions)
    print(f"wrote {record['examples']} examples of {record['context']} tokens to {args.out / 'texts'}; next: "
          f"{record['train']} --layout tiny ...")
    return 0


__all__ = ["add_arguments", "draft_texts", "passage_chars", "run", "write_corpus"]
