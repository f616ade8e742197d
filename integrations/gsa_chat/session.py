"""A chat session: the conversation, its settings and template, kept in the store as it happens.

Why separate from the terminal loop: the order of writes is what makes a crash safe (the user's message
is committed before generation starts, the reply row exists from the first token and its text is
updated while it streams), and the REPL, the scripted demo and the tests share that order here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gsa_chat.models import ChatModel
from gsa_chat.sampling import Reply, SamplingSettings, generate_reply
from gsa_chat.store import Session, Store
from gsa_chat.templates import Template, TemplateError, encode_prompt, resolve_template
from gsa_core.errors import GSAError

#: How often a streaming reply's text is written to the database (seconds).
FLUSH_EVERY_S = 0.2


class ChatError(GSAError):
    """A chat action that cannot be done now (e.g. ``/regen`` before any message)."""


class ChatSession:
    """One conversation with ``chat_model``, persisted in ``store``."""

    def __init__(self, store: Store, chat_model: ChatModel, session: Session, template: Template,
                 settings: SamplingSettings):
        self.store, self.chat_model, self.session = store, chat_model, session
        self.template, self.settings = template, settings

    # construction ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, store: Store, chat_model: ChatModel, *, template: str = "auto",
              settings: SamplingSettings | None = None, system: str = "") -> ChatSession:
        """A new, empty session."""
        tmpl = resolve_template(template, chat_model.tokenizer, chat_model.name)
        settings = settings or SamplingSettings()
        session = store.create_session(model=chat_model.name, template=tmpl.name,
                                       settings=settings.model_dump(), system=system)
        return cls(store, chat_model, session, tmpl, settings)

    @classmethod
    def resume(cls, store: Store, chat_model: ChatModel, key: int | str,
               overrides: dict[str, str] | None = None) -> tuple[ChatSession, list[str]]:
        """An existing session (id or name) with its template and settings; returns notes for the user."""
        session = store.session(key, with_messages=False)
        chat = cls(store, chat_model, session, resolve_template("auto", chat_model.tokenizer, chat_model.name),
                   SamplingSettings())
        notes: list[str] = []
        chat._adopt(session, notes)
        for name, value in (overrides or {}).items():
            chat.set(name, value)
        return chat, notes

    def _adopt(self, session: Session, notes: list[str]) -> None:
        self.session = session
        try:
            self.template = resolve_template(session.template or "auto", self.chat_model.tokenizer,
                                             self.chat_model.name)
        except TemplateError as exc:
            self.template = resolve_template("auto", self.chat_model.tokenizer, self.chat_model.name)
            notes.append(f"{exc}; using {self.template.name!r}")
        try:
            self.settings = SamplingSettings.model_validate({**SamplingSettings().model_dump(), **session.settings})
        except ValueError:
            self.settings = SamplingSettings()
            notes.append("the saved sampling settings were invalid; using the defaults")
        if session.model and session.model != self.chat_model.name:
            notes.append(f"this session was recorded with {session.model}; continuing with {self.chat_model.name}")

    # conversation -----------------------------------------------------------------------------------
    def turns(self) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in self.store.messages(self.session.id) if m.role in ("user", "assistant")]

    def prompt_ids(self, turns: list[tuple[str, str]]) -> list[int]:
        return encode_prompt(self.template, turns, self.session.system, self.chat_model.tokenizer)

    def send(self, text: str, *, on_text: Callable[[str], None] = lambda s: None,
             interrupt: threading.Event | None = None) -> Reply:
        """Store the user's message (committed before generating), then stream and store the reply."""
        self.store.add_message(self.session.id, "user", text)
        return self._reply(on_text, interrupt)

    def regenerate(self, *, on_text: Callable[[str], None] = lambda s: None,
                   interrupt: threading.Event | None = None) -> Reply:
        """Replace the last reply with a new one (the old one stays in the database as ``replaced``)."""
        messages = [m for m in self.store.messages(self.session.id) if m.role in ("user", "assistant")]
        if not messages:
            raise ChatError("nothing to regenerate yet: send a message first")
        if messages[-1].role == "assistant":
            self.store.update_message(messages[-1].id, status="replaced")
        return self._reply(on_text, interrupt)

    def _reply(self, on_text: Callable[[str], None], interrupt: threading.Event | None) -> Reply:
        ids = self.prompt_ids(self.turns())
        message_id = self.store.add_message(self.session.id, "assistant", "", status="streaming")
        parts: list[str] = []
        last = time.monotonic()

        def stream(piece: str) -> None:
            nonlocal last
            parts.append(piece)
            on_text(piece)
            if time.monotonic() - last >= FLUSH_EVERY_S:
                self.store.update_message(message_id, content="".join(parts))
                last = time.monotonic()

        settings = self.settings
        if self.template.stop:
            settings = settings.model_copy(update={"stop": [*settings.stop, *self.template.stop]})
        try:
            reply = generate_reply(self.chat_model.model, self.chat_model.tokenizer, ids, settings,
                                   on_text=stream, interrupt=interrupt)
        except BaseException:
            self.store.update_message(message_id, content="".join(parts), status="stopped")
            raise
        status = "stopped" if reply.finish_reason == "interrupted" else "done"
        self.store.update_message(message_id, content=reply.text, status=status)
        return reply

    # commands ---------------------------------------------------------------------------------------
    def set(self, name: str, value: str) -> str:
        """``/set NAME VALUE`` for a sampling setting or ``template``; returns the value as now set."""
        if name == "template":
            self.template = resolve_template(value.strip(), self.chat_model.tokenizer, self.chat_model.name)
            self.store.update_session(self.session.id, template=self.template.name)
            return self.template.name
        self.settings = self.settings.with_value(name, value)
        self.store.update_session(self.session.id, settings=self.settings.model_dump())
        return self.settings.display(name)

    def set_system(self, text: str) -> None:
        self.store.update_session(self.session.id, system=text)
        self.store.add_message(self.session.id, "system", text)
        self.session = self.store.session(self.session.id, with_messages=False)

    def save(self, name: str) -> None:
        name = name.strip()
        if not name or name.lstrip("#").isdigit():
            raise ChatError(f"bad session name {name!r}: use a name with at least one letter (ids are numbers)")
        self.store.update_session(self.session.id, name=name)
        self.session = self.store.session(self.session.id, with_messages=False)

    def load(self, key: str) -> list[str]:
        notes: list[str] = []
        self._adopt(self.store.session(key, with_messages=False), notes)
        return notes

    def reset(self) -> None:
        """Start a new empty session with the same model, template, settings and system prompt."""
        self.session = self.store.create_session(model=self.chat_model.name, template=self.template.name,
                                                 settings=self.settings.model_dump(), system=self.session.system)

    def describe(self) -> dict[str, Any]:
        return {"session": self.session.label, "model": self.chat_model.name, "template": self.template.name,
                **{k: self.settings.display(k) for k in type(self.settings).model_fields}}


__all__ = ["FLUSH_EVERY_S", "ChatError", "ChatSession"]
