"""Prompt templates: how a conversation becomes the text a causal language model continues.

Why named templates in one table: a model only answers well in the layout it was trained on, so the
layout is a choice (``--template``, ``/set template``), and a misspelt name gets the list of valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsa_core.errors import GSAError, did_you_mean

Turn = tuple[str, str]  # (role, content), role in {"user", "assistant"}

#: TinyStories-Instruct's instruction fields, in the order they are written before ``Story:``.
TINYSTORIES_FIELDS = ("Summary", "Features", "Words", "Random sentence")
_FIELD_ALIASES = {"summary": "Summary", "features": "Features", "words": "Words",
                  "random sentence": "Random sentence", "sentence": "Random sentence"}
_FIELD_LINE = re.compile(r"^\s*(summary|features|random sentence|sentence|words)\s*:\s*(.*)$", re.IGNORECASE)


class TemplateError(GSAError):
    """An unknown template name, or a template the model cannot use."""


@dataclass(frozen=True)
class Template:
    """``render(turns, system, tokenizer)`` gives the prompt; the reply is whatever the model adds."""

    name: str
    description: str
    render: Callable[[Sequence[Turn], str, Any], str]
    #: Start the prompt with the tokenizer's ``bos`` token (models trained on ``bos text eos`` documents).
    prepend_bos: bool = True
    #: Whether the system prompt (``/system``) changes the rendered text.
    uses_system: bool = True
    #: Text that ends a reply in this layout (added to the user's stop strings), e.g. the start of a new entry.
    stop: tuple[str, ...] = ()


def tinystories_fields(text: str) -> dict[str, str]:
    """The instruction fields of one user message: ``Key: value`` lines; anything else is the summary."""
    fields: dict[str, str] = {}
    loose: list[str] = []
    for line in text.strip().splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            fields[_FIELD_ALIASES[match.group(1).lower()]] = match.group(2).strip()
        elif line.strip():
            loose.append(line.strip())
    if loose:
        fields["Summary"] = " ".join([fields.get("Summary", ""), *loose]).strip()
    return fields


def render_tinystories_instruct(turns: Sequence[Turn], system: str = "", tokenizer: Any = None) -> str:
    """The TinyStories-Instruct layout for the latest user message::

        Summary: <summary>
        Features: <features>
        Words: <words>
        Random sentence: <sentence>
        Story:
        <the model writes the story here>

    Only the fields given are written, always in this order (the data set varies the order; one fixed order
    keeps prompts comparable). Earlier turns are left out: the data set's entries are independent
    stories, so earlier ones are not context the model knows how to use.
    """
    user = next((content for role, content in reversed(turns) if role == "user"), "")
    fields = tinystories_fields(user)
    lines = [f"{key}: {fields[key]}" for key in TINYSTORIES_FIELDS if fields.get(key)]
    return "\n".join([*lines, "Story:\n"])


def render_plain(turns: Sequence[Turn], system: str = "", tokenizer: Any = None) -> str:
    """The conversation as plain text, one message per line; the reply continues the last message.

    For base models trained on raw text (like the embedded default): the user writes the start of a
    text and the model carries on.
    """
    parts = [system.strip()] if system.strip() else []
    parts += [content for _, content in turns]
    return "\n".join(parts)


def render_chat_template(turns: Sequence[Turn], system: str = "", tokenizer: Any = None) -> str:
    """The tokenizer's own chat template (``apply_chat_template`` with the generation prompt)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        others = ", ".join(n for n in TEMPLATE_NAMES if n != "chat-template")
        raise TemplateError("the template 'chat-template' needs a tokenizer with a chat template, and this model's "
                            f"tokenizer has none; use one of: {others}")
    messages = ([{"role": "system", "content": system}] if system.strip() else [])
    messages += [{"role": role, "content": content} for role, content in turns]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


TEMPLATES: dict[str, Template] = {
    "tinystories-instruct": Template(
        "tinystories-instruct", "Summary:/Features:/Words:/Random sentence: lines, then 'Story:'",
        render_tinystories_instruct, uses_system=False, stop=tuple(f"\n{key}:" for key in TINYSTORIES_FIELDS)),
    "plain": Template("plain", "the conversation as plain text; the model continues it", render_plain),
    "chat-template": Template("chat-template", "the tokenizer's chat template (apply_chat_template)",
                              render_chat_template, prepend_bos=False),
}
#: ``auto`` is resolved per model by :func:`resolve_template`.
TEMPLATE_NAMES = ("auto", *TEMPLATES)


def get_template(name: str) -> Template:
    """A template by name; an unknown one names the valid choices."""
    try:
        return TEMPLATES[name]
    except KeyError:
        hint = did_you_mean(name, TEMPLATE_NAMES)
        extra = f" Did you mean {hint!r}?" if hint else ""
        raise TemplateError(f"unknown template {name!r}.{extra} Available templates: {', '.join(TEMPLATE_NAMES)}."
                            ) from None


def resolve_template(name: str, tokenizer: Any = None, model_name: str | Path = "") -> Template:
    """``auto``: the tokenizer's chat template if it has one, TinyStories-Instruct for a model whose name
    says so, otherwise plain text. Any other name is looked up as is (and checked against the tokenizer)."""
    if name == "auto":
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return TEMPLATES["chat-template"]
        lowered = str(model_name).lower().replace("_", "").replace("-", "")
        if "tinystories" in lowered and "instruct" in lowered:
            return TEMPLATES["tinystories-instruct"]
        return TEMPLATES["plain"]
    template = get_template(name)
    if template.name == "chat-template" and tokenizer is not None:
        template.render([], "", tokenizer)  # raises a clear error now rather than at the first message
    return template


def encode_prompt(template: Template, turns: Sequence[Turn], system: str, tokenizer: Any) -> list[int]:
    """The token ids a model continues for ``turns``: the rendered text, after ``bos`` when the template asks.

    One function for every caller (the chat session, the server), so a conversation always becomes the
    same ids, and a server's cached state after a prefix matches the next turn's prompt.
    """
    text = template.render(turns, system, tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if template.prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


__all__ = ["TEMPLATES", "TEMPLATE_NAMES", "Template", "TemplateError", "encode_prompt", "get_template",
           "render_chat_template", "render_plain", "render_tinystories_instruct", "resolve_template",
           "tinystories_fields"]
