"""What one server accepts: session slots, queue length, prompt and reply sizes; and the errors for breaking them.

Why in one place: the HTTP layer and the engine check requests against the same numbers, so no path
(a direct ``Engine.submit`` included) can start a generation the model cannot finish (a prompt plus
reply longer than its positions) or that exceeds what the operator allowed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gsa_core.errors import GSAError


class LimitError(GSAError):
    """A request breaking a limit: the message, the request parameter at fault and an OpenAI-style code."""

    def __init__(self, message: str, *, param: str | None, code: str) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class QueueFullError(GSAError):
    """Every session slot is busy and the waiting queue is full: try again later."""


class EngineStoppedError(GSAError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


class Limits(BaseModel):
    """The operator's bounds (``gsa serve`` options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sessions: int = Field(16, ge=1, le=4096, description="sessions decoding at once (the batch's rows)")
    max_queue: int = Field(64, ge=0, le=1_000_000, description="requests waiting for a slot; beyond: 429")
    max_prompt_tokens: int = Field(8192, ge=1, le=10**7, description="tokens of one prompt")
    max_tokens: int = Field(4096, ge=1, le=100_000, description="the largest max_tokens a request may ask for")
    prefill_chunk: int = Field(512, ge=1, le=1 << 16, description="prompt tokens per prefill forward")

    def check(self, prompt_tokens: int, max_new_tokens: int, max_positions: int | None, *,
              prompt_param: str = "messages") -> None:
        """Raise :class:`LimitError` when a prompt of ``prompt_tokens`` asking ``max_new_tokens`` breaks a limit
        (``prompt_param``: the request field that holds the prompt, named in the error)."""
        if prompt_tokens < 1:
            raise LimitError("the prompt is empty: give at least one token of text", param=prompt_param,
                             code="empty_prompt")
        if prompt_tokens > self.max_prompt_tokens:
            raise LimitError(f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                             f"{self.max_prompt_tokens} (gsa serve --max-prompt-tokens)", param=prompt_param,
                             code="context_length_exceeded")
        if max_new_tokens > self.max_tokens:
            raise LimitError(f"max_tokens is {max_new_tokens}; this server allows at most {self.max_tokens} "
                             "(gsa serve --max-tokens)", param="max_tokens", code="max_tokens_exceeded")
        if max_positions is not None and prompt_tokens + max_new_tokens > max_positions:
            raise LimitError(f"this model's maximum context length is {max_positions} tokens, but the prompt has "
                             f"{prompt_tokens} and max_tokens asks for {max_new_tokens} more; shorten the prompt or "
                             "lower max_tokens", param="max_tokens", code="context_length_exceeded")

    def default_max_tokens(self, prompt_tokens: int, max_positions: int | None) -> int:
        """``max_tokens`` for a request that gives none: as many as the limit and the model's positions allow."""
        room = self.max_tokens if max_positions is None else min(self.max_tokens, max_positions - prompt_tokens)
        return max(room, 1)


__all__ = ["EngineStoppedError", "LimitError", "Limits", "QueueFullError"]
