"""The passkey task (Landmark Attention's format): a number hidden in filler text, asked for at the end.

One example, for a tokenizer and a length of ``n`` tokens::

    <eos>There is a pass key hidden in this text. Find it and remember it. <filler> The pass key is 42.
    Remember it. 42 is the pass key. <filler> What is the pass key? Answer: 42.

The needle sits after ``depth`` of the filler (0: first, 1: last). The filler repeats a few short sentences
in order (from a random one), and its length is chosen so that the example has *exactly* ``n`` tokens with
the given tokenizer (byte-level BPE never merges across words, so sentence lengths add up), answer
included: a model fine-tuned on ``n``-token examples is asked at ``n`` tokens (1x), ``2n``, ... The
prompt is the example without its answer; the model must generate the number (greedy), and a trial is
correct when the first number of the continuation is the key. Everything is a pure function of a seed.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

from gsa_core.errors import ConfigError

INTRO = "There is a pass key hidden in this text. Find it and remember it."
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer:"
ANSWER = " {key}."
#: Most digits of a key: beyond, a key is no longer a "number" a small model could copy.
MAX_KEY_DIGITS = 12
_NUMBER = re.compile(r"\s*(\d+)")


def random_key(rng: random.Random, digits: int) -> str:
    """A key of ``digits`` digits, without a leading zero (a one-digit key may be 0-9)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return str(rng.randrange(low, 10**digits))


def first_number(text: str) -> str | None:
    """The number a continuation starts with (spaces allowed before it), or None."""
    found = _NUMBER.match(text)
    return found.group(1) if found else None


def is_correct(continuation: str, key: str) -> bool:
    return first_number(continuation) == key


def wilson_interval(correct: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sensible at 0/n and n/n, unlike the normal one)."""
    if trials == 0:
        return (0.0, 1.0)
    p = correct / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    # at 0/n and n/n the bound is exactly 0 or 1 (the formula gives it up to rounding)
    return (0.0 if correct == 0 else max(0.0, centre - half), 1.0 if correct == trials else min(1.0, centre + half))


@dataclass(frozen=True)
class Example:
    """One passkey example: the token ids of the prompt (eos first) and of the answer, the key, the needle's depth."""

    prompt: list[int]
    answer: list[int]
    key: str
    depth: float

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.answer)

    def text(self, tokenizer: Any) -> str:
        """The whole example as text (the corpus of the fine-tuning recipe; eos left out)."""
        return tokenizer.decode(self.prompt[1:] + self.answer)


class PasskeyFormat:
    """Builds examples of an exact token count for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no end-of-text token (eos), which starts every passkey prompt")
        self.tokenizer = tokenizer
        self.filler = [(s, self.count(" " + s)) for s in FILLER]
        words = {w for s in FILLER for w in s.rstrip(".").split()}
        self.unit = next((" " + w for w in sorted(words) if self.count(" " + w) == 1), None)  # tops up exactly

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def minimum(self, key: str, questions: int = 1) -> int:
        """Tokens of an example without filler (``questions``: question-answer pairs, the last one the prompt's)."""
        qa = self.count(" " + QUESTION) + self.count(ANSWER.format(key=key))
        return 1 + self.count(INTRO) + self.count(" " + NEEDLE.format(key=key)) + questions * qa

    def _fill(self, tokens: int, rng: random.Random) -> list[str]:
        """Filler of ``tokens`` tokens: the sentences in their order, from a random one, cut at the end with
        one-token words."""
        parts: list[str] = []
        i = rng.randrange(len(self.filler))
        while tokens >= self.filler[i][1]:
            parts.append(self.filler[i][0])
            tokens -= self.filler[i][1]
            i = (i + 1) % len(self.filler)
        if tokens and self.unit is not None:
            parts.extend([self.unit.strip()] * tokens)
        return parts

    def example(self, tokens: int, depth: float, key: str, rng: random.Random, *, questions: int = 1) -> Example:
        """An example of ``tokens`` tokens (prompt + answer) with the needle at ``depth`` of the filler.

        ``questions > 1`` (fine-tuning examples): as many question-answer pairs in all, the earlier ones at random
        points of the filler after the needle, so one example practises retrieval over several distances.
        """
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"passkey depths are fractions of the filler in [0, 1], got {depth}")
        if questions < 1:
            raise ConfigError(f"a passkey example asks at least one question, got {questions}")
        budget = tokens - self.minimum(key, questions)
        if budget < 0:
            raise ConfigError(f"a passkey example needs at least {self.minimum(key, questions)} tokens with this "
                              f"tokenizer; {tokens} is too short")
        before = round(depth * budget)
        rest = budget - before
        cuts = sorted(rng.randrange(rest + 1) for _ in range(questions - 1))
        after: list[str] = []
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, rest], strict=True)):
            after += self._fill(b - a, rng)
            if i < questions - 1:
                after.append(QUESTION + ANSWER.format(key=key))
        text = " ".join([INTRO, *self._fill(before, rng), NEEDLE.format(key=key), *after, QUESTION])
        prompt = [int(self.tokenizer.eos_token_id), *self.ids(text)]
        return Example(prompt, self.ids(ANSWER.format(key=key)), key, depth)

    def trial(self, tokens: int, depth: float, digits: int, seed: int, index: int) -> Example:
        """Trial ``index`` at one length and depth: its key and filler drawn from a seed of all four."""
        rng = random.Random(f"passkey:{seed}:{tokens}:{depth}:{index}")
        return self.example(tokens, depth, random_key(rng, digits), rng)


__all__ = [
    "ANSWER", "FILLER", "INTRO", "MAX_KEY_DIGITS", "NEEDLE", "QUESTION", "Example", "PasskeyFormat", "first_number",
    "is_correct", "random_key", "wilson_interval",
]
