"""``gsa chat --demo``: a scripted conversation with the embedded default model, then the saved session.

Why scripted: it shows, without anyone typing, everything a chat does (streamed replies, ``/set``,
``/regen``, ``/history``) on a model trained locally on first use, and that the session is in the
database afterwards (``gsa logs show ID``).
"""

from __future__ import annotations

from gsa_chat.models import ChatModel, load_chat_model
from gsa_chat.repl import Output, Repl, script_reader
from gsa_chat.sampling import SamplingSettings
from gsa_chat.session import ChatSession
from gsa_chat.store import Store

#: The default model continues Python docstrings, so the messages are openings of docstrings.
DEMO_SCRIPT = (
    "Return a new list",
    "/set temperature 0.5",
    "/regen",
    "Open the file and",
    "/history",
)
DEMO_SETTINGS = SamplingSettings(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, max_new_tokens=48,
                                 seed=0)


def run_demo(chat_model: ChatModel | None = None, store: Store | None = None, *,
             script: tuple[str, ...] | list[str] = DEMO_SCRIPT, out: Output | None = None) -> int:
    """Run the script on ``chat_model`` (default: the embedded model) and show the stored session."""
    out = out or Output()
    chat_model = chat_model or load_chat_model(None, progress=True)
    store = store or Store()
    chat = ChatSession.start(store, chat_model, settings=DEMO_SETTINGS)
    Repl(chat, out, script_reader(list(script), out)).run()
    session = store.session(chat.session.id)
    out.note(f"\nstored in {store.path}: session {session.label}, {len(session.messages)} messages "
             f"(see them with: gsa logs show {session.id})", style="bold")
    for m in session.messages:
        out.note(f"  [{m.id}] {m.role} ({m.status}): {m.content[:70]!r}", style="")
    return 0


__all__ = ["DEMO_SCRIPT", "DEMO_SETTINGS", "run_demo"]
