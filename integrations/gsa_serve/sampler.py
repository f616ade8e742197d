"""Choosing each row's next token: the chat's sampling settings, applied per request inside a batched step.

Why per row: requests in one batch each have their own temperature, top-p, penalty and seed, so the
batched logits are split and each row goes through its own processors and its own random generator.
The settings are ``gsa_chat``'s :class:`~gsa_chat.sampling.SamplingSettings` (one validation) and their
meaning is its ``generation_config`` (one mapping to transformers' terms); the processors are
transformers' own classes, in the order ``generate()`` applies them (repetition penalty, then
temperature, top-k, top-p, min-p). Greedy rows (temperature 0) take the argmax.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
from gsa_chat.sampling import SamplingSettings
from torch import Tensor


class RowSampler:
    """The next-token choice of one request: its processors and, when sampling, its seeded generator."""

    def __init__(self, settings: SamplingSettings, tokenizer: Any, device: torch.device | str = "cpu") -> None:
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        config = settings.generation_config(tokenizer)
        self.greedy = not config.do_sample
        processors = LogitsProcessorList()
        if config.repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if not self.greedy:
            if config.temperature not in (None, 1.0):
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                processors.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                processors.append(TopPLogitsWarper(config.top_p))
            if config.min_p:
                processors.append(MinPLogitsWarper(config.min_p))
        self.processors = processors
        self.needs_history = config.repetition_penalty not in (None, 1.0)
        self.seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        self.generator = None if self.greedy else torch.Generator(device=device).manual_seed(self.seed)

    def scores(self, logits: Tensor, history: Tensor | None = None) -> Tensor:
        """``logits [vocab]`` after this request's processors (``history``: the ids so far, for the penalty)."""
        if not self.processors:
            return logits
        ids = history if history is not None else logits.new_zeros((0,), dtype=torch.long)
        # a copy: the logits may be a prefix-cache entry's, shared with other requests
        return self.processors(ids.view(1, -1), logits.clone().view(1, -1)).view(-1)

    def __call__(self, logits: Tensor, history: Tensor | None = None) -> int:
        """The next token for ``logits [vocab]``."""
        scores = self.scores(logits, history)
        if self.greedy:
            return int(scores.argmax())
        probs = torch.softmax(scores.float(), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


__all__ = ["RowSampler"]
