"""Prompt templates: the TinyStories-Instruct layout exactly, plain text, chat templates, names."""

from __future__ import annotations

import pytest
from gsa_chat.templates import (
    TEMPLATE_NAMES,
    TemplateError,
    get_template,
    render_plain,
    render_tinystories_instruct,
    resolve_template,
    tinystories_fields,
)
from hypothesis import given
from hypothesis import strategies as st


class _Tok:
    """Just enough of a tokenizer for templates: a Jinja chat template or none."""

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        out = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


def test_tinystories_instruct_layout_exactly() -> None:
    message = ("Words: cat, sun, hat\nFeatures: Dialogue, Twist\nSummary: A cat finds a hat.\n"
               "Random sentence: It was red.")
    assert render_tinystories_instruct([("user", message)]) == (
        "Summary: A cat finds a hat.\n"
        "Features: Dialogue, Twist\n"
        "Words: cat, sun, hat\n"
        "Random sentence: It was red.\n"
        "Story:\n"
    )


def test_tinystories_plain_text_is_the_summary_and_only_the_last_message_counts() -> None:
    turns = [("user", "an old request"), ("assistant", "an old story"), ("user", "A dog loses a ball.\nWords: ball")]
    assert render_tinystories_instruct(turns) == "Summary: A dog loses a ball.\nWords: ball\nStory:\n"
    assert render_tinystories_instruct([]) == "Story:\n"
    assert tinystories_fields("sentence: Hi.\nWORDS: a, b") == {"Random sentence": "Hi.", "Words": "a, b"}


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60)
       .filter(lambda s: ":" not in s and s.strip()))
def test_any_free_text_becomes_the_summary(text: str) -> None:
    assert render_tinystories_instruct([("user", text)]) == f"Summary: {text.strip()}\nStory:\n"


def test_plain_joins_messages_and_the_reply_continues_the_last() -> None:
    turns = [("user", "def add(a, b):"), ("assistant", "    return a + b"), ("user", "Return the")]
    assert render_plain(turns) == "def add(a, b):\n    return a + b\nReturn the"
    assert render_plain([("user", "x")], system="Be brief.") == "Be brief.\nx"


def test_chat_template_uses_the_tokenizer_and_errors_without_one() -> None:
    template = get_template("chat-template")
    prompt = template.render([("user", "hi")], "sys", _Tok("{{ messages }}"))
    assert prompt == "<system>sys</system><user>hi</user><assistant>"
    assert template.prepend_bos is False
    with pytest.raises(TemplateError, match="has none; use one of: auto, tinystories-instruct, plain"):
        resolve_template("chat-template", _Tok(None))


def test_auto_picks_by_tokenizer_and_model_name() -> None:
    assert resolve_template("auto", _Tok("{{x}}")).name == "chat-template"
    assert resolve_template("auto", _Tok(None), "/models/TinyStories-Instruct-33M").name == "tinystories-instruct"
    assert resolve_template("auto", _Tok(None), "/models/reference").name == "plain"


def test_unknown_template_names_the_choices() -> None:
    with pytest.raises(TemplateError, match=r"unknown template 'plian'. Did you mean 'plain'\? Available templates: "
                                            + ", ".join(TEMPLATE_NAMES)):
        get_template("plian")
