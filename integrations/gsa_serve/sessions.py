"""Served conversations in the chat's SQLite store (``gsa serve --store``), so ``gsa logs`` shows them.

Why a writer thread: SQLite writes wait on the disk (and on other writers' locks), and the event loop
must never wait. Handlers call :meth:`SessionRecorder.record`, which only puts the finished exchange
on a queue; one thread owns the store and writes it. The OpenAI API is stateless, so a conversation is
recognised by its content: a request whose messages (all but the last) are exactly an earlier
request's messages plus the reply it got continues that session; anything else starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from gsa_chat.store import Store

from gsa_serve.schemas import ChatMessage

log = logging.getLogger("gsa_serve")
_STOP = object()


def conversation_key(messages: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(messages), ensure_ascii=False).encode("utf-8")).hexdigest()


def _role(role: str) -> str:
    return "system" if role == "developer" else role


class SessionRecorder:
    """Writes each finished chat exchange to ``store`` from its own thread (after :meth:`start`)."""

    def __init__(self, store: Store, model: str, template: str) -> None:
        self.store, self.model, self.template = store, model, template
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sessions: dict[str, int] = {}  # conversation key -> session id (this process's sessions)
        self._thread: threading.Thread | None = None
        self.written = 0  # exchanges written (for tests and the log)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gsa-sessions", daemon=True)
            self._thread.start()

    def record(self, messages: Sequence[ChatMessage], reply: str) -> None:
        """Queue one exchange (never blocks)."""
        self._queue.put(([(_role(m.role), m.content or "") for m in messages], reply))

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread and close the store."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        self.store.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            try:
                self._write(*item)
            except Exception:  # a full disk must not end the server: the reply was already sent
                log.exception("could not store a served conversation")

    def _write(self, messages: list[tuple[str, str]], reply: str) -> None:
        known = self._sessions.pop(conversation_key(messages[:-1]), None) if len(messages) > 1 else None
        if known is None:
            system = "\n".join(c for r, c in messages if r == "system")
            session_id = self.store.create_session(model=self.model, template=self.template, system=system).id
            new = messages
        else:
            session_id, new = known, messages[-1:]
        for role, content in new:
            self.store.add_message(session_id, role, content)
        self.store.add_message(session_id, "assistant", reply)
        self._sessions[conversation_key([*messages, ("assistant", reply)])] = session_id
        self.written += 1


__all__ = ["SessionRecorder", "conversation_key"]
