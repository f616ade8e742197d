"""``gsa chat [MODEL]``: chat in the terminal with streamed replies; sessions kept in SQLite."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a folder saved with save_pretrained (model + tokenizer) or a hub name; "
                             "default: the embedded reference model (trained on first use, no download)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--continue", dest="cont", action="store_true", help="continue the most recent session")
    resume.add_argument("--session", metavar="ID", help="continue the session with this id or name")
    parser.add_argument("--template", default=None, metavar="NAME",
                        help="prompt template: auto (default), tinystories-instruct, plain, chat-template")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="PARAM=VALUE",
                        help="a sampling setting, e.g. --set temperature=0.5 (repeatable; /set in the chat)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt for a new session")
    scripted = parser.add_mutually_exclusive_group()
    scripted.add_argument("--script", type=Path, metavar="FILE",
                          help="read the conversation from FILE (one input line per line) instead of the keyboard")
    scripted.add_argument("--demo", action="store_true",
                          help="a scripted conversation with the embedded default model, then the stored session")
    parser.set_defaults(handler=run)


def _pairs(items: list[str]) -> dict[str, str]:
    from gsa_core.errors import GSAError

    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise GSAError(f"--set takes PARAM=VALUE (e.g. --set temperature=0.5), got {item!r}")
        out[name.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    from gsa_chat.models import load_chat_model
    from gsa_chat.repl import Output, Repl, script_reader
    from gsa_chat.sampling import SamplingSettings
    from gsa_chat.session import ChatSession
    from gsa_chat.store import Store

    from gsa_core.errors import GSAError

    overrides = _pairs(args.settings)
    template = overrides.pop("template", None) or args.template
    if args.demo:
        from gsa_chat.demo import run_demo

        if args.model or args.cont or args.session:
            raise GSAError("--demo runs its own session on the embedded default model; drop MODEL, --continue "
                           "and --session")
        return run_demo()
    out = Output()
    lines = None
    if args.script is not None:
        from gsa_data.files import read_text

        lines = read_text(args.script, what="--script").splitlines()
    chat_model = load_chat_model(args.model)
    store = Store()
    key = args.session
    if args.cont:
        latest = store.latest_session()
        if latest is None:
            out.note("no saved session to continue; starting a new one")
        else:
            key = str(latest.id)
    if key is not None:
        chat, notes = ChatSession.resume(store, chat_model, key, overrides)
        if template:
            chat.set("template", template)
        if args.system is not None:
            chat.set_system(args.system)
        for note in notes:
            out.note(note)
        out.note(f"continuing session {chat.session.label} ({len(chat.turns())} messages; /history shows them)")
    else:
        settings = SamplingSettings()
        for name, value in overrides.items():
            settings = settings.with_value(name, value)
        chat = ChatSession.start(store, chat_model, template=template or "auto", settings=settings,
                                 system=args.system or "")
    read_line = script_reader(lines, out) if lines is not None else None
    try:
        return Repl(chat, out, read_line).run()
    finally:
        store.close()
