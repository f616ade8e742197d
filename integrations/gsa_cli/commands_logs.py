"""``gsa logs``: list saved chat sessions, or show one (``--json`` for scripts)."""

from __future__ import annotations

import argparse
import datetime as dt

#: ``--limit`` beyond this lists everything anyway.
MAX_LIMIT = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=("list", "show"),
                        help="list the sessions (default) or show one")
    parser.add_argument("session", nargs="?", metavar="ID", help="with show: the session's id or name")
    parser.add_argument("--limit", type=int, default=50,
                        help=f"list at most this many sessions (default 50, at most {MAX_LIMIT:,})")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)


def _when(timestamp: float) -> str:
    try:
        return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError, TypeError):  # a hand-edited row
        return str(timestamp)


def run(args: argparse.Namespace) -> int:
    from gsa_chat.store import Store, default_path, session_dict
    from gsa_common import check_range

    from gsa_cli.output import print_json, print_table
    from gsa_core.errors import GSAError

    if args.action == "list" and args.session is not None:
        raise GSAError(f"gsa logs list takes no ID (got {args.session!r}); use gsa logs show ID")
    if args.action == "show" and args.session is None:
        raise GSAError("gsa logs show needs a session id or name: gsa logs show ID")
    check_range("--limit", args.limit, 1, MAX_LIMIT)
    path = default_path()
    if not path.exists():  # reading never creates the database
        if args.action == "show":
            raise GSAError(f"no chat session with id or name {args.session!r}: there are no saved sessions yet "
                           f"({path} does not exist)")
        if args.json:
            print_json({"database": str(path), "sessions": []})
        else:
            print(f"no chat sessions yet ({path} does not exist; gsa chat creates it)")
        return 0
    with Store(path, read_only=True) as store:
        if args.action == "list":
            sessions = store.sessions(limit=args.limit)
            counts = {s.id: store.message_count(s.id) for s in sessions}
            if args.json:
                print_json({"database": str(store.path),
                            "sessions": [{**session_dict(s), "messages": counts[s.id]} for s in sessions]})
            else:
                rows = [(s.id, s.name or "", counts[s.id], s.template, s.model, _when(s.updated_at)) for s in sessions]
                print_table(f"chat sessions in {store.path}", ("id", "name", "messages", "template", "model",
                                                               "updated"), rows)
            return 0
        session = store.session(args.session)
        if args.json:
            print_json(session_dict(session, session.messages))
        else:
            print_table(f"session {session.label} · {session.model} · template {session.template}",
                        ("id", "role", "status", "content"),
                        [(m.id, m.role, m.status, m.content) for m in session.messages])
    return 0
