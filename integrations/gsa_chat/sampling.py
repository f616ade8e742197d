"""Sampling settings and streamed generation through ``transformers`` (nothing re-implemented).

Why a pydantic model: ``/set``, ``--set`` and the saved session all go through the same validation, so a
bad value gets one clear message naming the valid range; the settings then become a
``GenerationConfig`` whose logits processors (temperature, top-k, top-p, min-p, repetition penalty)
and ``stop_strings`` are transformers' own. Text streams through a ``TextStreamer`` subclass, and an
interrupt (Ctrl+C) is a stopping criterion, so generation ends cleanly and keeps what it produced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gsa_core.errors import GSAError, did_you_mean

FinishReason = Literal["stop", "length", "interrupted"]


class SettingsError(GSAError):
    """An unknown sampling parameter or a value outside its valid range."""


class SamplingSettings(BaseModel):
    """How replies are sampled. ``temperature = 0`` is greedy decoding (the other sampling knobs are unused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: float = Field(0.8, ge=0.0, le=5.0, description="a number from 0 to 5; 0 = greedy")
    top_k: int = Field(50, ge=0, description="a whole number ≥ 0; 0 = off")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="a number in (0, 1]; 1 = off")
    min_p: float = Field(0.0, ge=0.0, lt=1.0, description="a number in [0, 1); 0 = off")
    repetition_penalty: float = Field(1.1, gt=0.0, le=10.0, description="a number in (0, 10]; 1 = off")
    max_new_tokens: int = Field(128, ge=1, le=100_000, description="a whole number from 1 to 100000")
    seed: int | None = Field(None, ge=0, description="a whole number ≥ 0, or 'none' for a fresh seed per reply")
    stop: list[str] = Field(default_factory=list,
                            description="text that ends a reply: one string, a JSON list, or 'none'")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_value(self, name: str, text: str) -> SamplingSettings:
        """A copy with ``name`` set from its text form (``/set NAME VALUE``); errors name the valid range."""
        fields = type(self).model_fields
        if name not in fields:
            hint = did_you_mean(name, fields)
            extra = f" Did you mean {hint!r}?" if hint else ""
            raise SettingsError(f"unknown setting {name!r}.{extra} Settings: {', '.join(fields)}.")
        value: Any = _parse(name, text)
        try:
            return type(self).model_validate({**self.model_dump(), name: value})
        except ValidationError:
            raise SettingsError(f"bad value for {name}: {text!r}; expected {fields[name].description}. "
                                f"{name} is still {self.display(name)}.") from None

    def display(self, name: str) -> str:
        """A setting's value as ``/set`` would take it back."""
        value = getattr(self, name)
        if name == "stop":
            return ", ".join(repr(s) for s in value) or "none"
        return "none" if value is None else str(value)

    def generation_config(self, tokenizer: Any, model: Any = None) -> Any:
        """The ``transformers.GenerationConfig`` for these settings (``eos``/``pad`` from the tokenizer)."""
        from transformers import GenerationConfig

        eos = tokenizer.eos_token_id
        if eos is None and model is not None:
            eos = getattr(model.config, "eos_token_id", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=not self.greedy,
                                      eos_token_id=eos, pad_token_id=pad)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p,
                          min_p=self.min_p or None)
        if self.stop:
            kwargs["stop_strings"] = list(self.stop)
        return GenerationConfig(**kwargs)


def _parse(name: str, text: str) -> Any:
    """The text form of a value: ``none`` for optional ones, JSON lists or one string for ``stop``."""
    import json

    text = text.strip()
    if name == "stop":
        if text.lower() in ("", "none"):
            return []
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return text
        if "\\" in text:  # lets "\n" mean a newline; non-ASCII survives through backslashreplace
            try:
                text = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
            except UnicodeDecodeError as exc:
                raise SettingsError(f"bad escape in the stop string {text!r} ({exc.reason}); write \\\\ for a "
                                    "backslash") from None
        return [text]
    if name == "seed" and text.lower() in ("none", "random", ""):
        return None
    return text


@dataclass
class Reply:
    text: str
    finish_reason: FinishReason
    new_tokens: int


class _Interrupt:
    """A stopping criterion that ends generation when ``event`` is set (by a SIGINT handler)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopFilter:
    """Holds back text that might be the start of a stop string, and cuts the reply at the first one."""

    def __init__(self, stop: Sequence[str], emit: Callable[[str], None]):
        self.stop, self.emit = [s for s in stop if s], emit
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.shown = ""
        self.done = False

    def feed(self, text: str, end: bool = False) -> None:
        if self.done:
            return
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.done = self.pending[:cut], True
        elif end or not self.hold:
            out = self.pending
        else:
            out = self.pending[:-self.hold] if len(self.pending) > self.hold else ""
        self.pending = self.pending[len(out):]
        if out:
            self.shown += out
            self.emit(out)


def _streamer(tokenizer: Any, filt: _StopFilter) -> Any:
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        tokens = 0

        def put(self, value: torch.Tensor) -> None:
            if not self.next_tokens_are_prompt:
                self.tokens += int(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            filt.feed(text, end=stream_end)

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def fit_context(ids: list[int], max_new_tokens: int, max_positions: int | None) -> tuple[list[int], int]:
    """Keep the prompt's most recent tokens so prompt + reply fit the model's positions."""
    if not max_positions:
        return ids, max_new_tokens
    new = min(max_new_tokens, max_positions - 1)
    keep = max(1, max_positions - new)
    return ids[-keep:], new


def generate_reply(model: Any, tokenizer: Any, prompt_ids: Sequence[int], settings: SamplingSettings, *,
                   on_text: Callable[[str], None] = lambda s: None,
                   interrupt: threading.Event | None = None) -> Reply:
    """Generate one reply to ``prompt_ids``, calling ``on_text`` with each new piece of text.

    With ``settings.seed`` set the reply is reproducible (same prompt, same settings, same text). Setting
    ``interrupt`` stops after the current token; the text so far is returned with reason ``interrupted``.
    """
    from transformers import StoppingCriteriaList

    interrupt = interrupt or threading.Event()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    ids, max_new = fit_context(list(prompt_ids), settings.max_new_tokens, max_positions)
    config = settings.generation_config(tokenizer, model)
    config.max_new_tokens = max_new
    filt = _StopFilter(settings.stop, on_text)
    streamer = _streamer(tokenizer, filt)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.no_grad():  # not inference_mode: the GSA recurrent cache reads tensor version counters
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, streamer=streamer, tokenizer=tokenizer,
                             stopping_criteria=StoppingCriteriaList([_Interrupt(interrupt)]))
    new_ids = out[0, input_ids.shape[1]:].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in settings.stop) if i >= 0]
    stopped_by_text = bool(cuts)
    if cuts:
        text = text[:min(cuts)]
    if filt.shown != text and text.startswith(filt.shown):  # flush what the stream still held back
        on_text(text[len(filt.shown):])
    if interrupt.is_set():
        reason: FinishReason = "interrupted"
    elif stopped_by_text or (new_ids and new_ids[-1] == config.eos_token_id) or len(new_ids) < max_new:
        reason = "stop"
    else:
        reason = "length"
    return Reply(text=text, finish_reason=reason, new_tokens=len(new_ids))


__all__ = ["Reply", "SamplingSettings", "SettingsError", "fit_context", "generate_reply"]

#: The stop-string filter as a public name: the server (``gsa_serve``) streams replies through it too.
StopFilter = _StopFilter
__all__ += ["StopFilter"]
