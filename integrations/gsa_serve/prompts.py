"""From a request to the token ids the model continues: chat messages through the chat's templates.

Why the chat's templates: the server and ``gsa chat`` must turn the same conversation into the same
prompt (``gsa_chat.templates.encode_prompt``), so a model answers alike in both and the server's
prefix states match the next turn. System and developer messages become the template's system
prompt; a text completion is its prompt as the ``plain`` template writes it (a ``bos`` first when the
tokenizer has one), or the token ids as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gsa_chat.templates import TEMPLATES, Template, encode_prompt

from gsa_serve.errors import APIError
from gsa_serve.schemas import ChatMessage


def conversation(messages: Sequence[ChatMessage]) -> tuple[list[tuple[str, str]], str]:
    """``(turns, system)``: user and assistant messages in order, system and developer ones joined."""
    system = "\n".join(m.content or "" for m in messages if m.role in ("system", "developer"))
    turns = [(m.role, m.content or "") for m in messages if m.role in ("user", "assistant")]
    return turns, system


def chat_prompt_ids(template: Template, messages: Sequence[ChatMessage], tokenizer: Any) -> list[int]:
    turns, system = conversation(messages)
    return encode_prompt(template, turns, system, tokenizer)


def completion_prompt_ids(prompt: str | list[int], tokenizer: Any, vocab_size: int) -> list[int]:
    """A text prompt as the ``plain`` template encodes it; token ids checked against the vocabulary."""
    if isinstance(prompt, str):
        return encode_prompt(TEMPLATES["plain"], [("user", prompt)], "", tokenizer)
    bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
    if bad:
        raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0 to {vocab_size - 1})",
                       param="prompt", code="invalid_value")
    return [int(t) for t in prompt]


__all__ = ["chat_prompt_ids", "completion_prompt_ids", "conversation"]
