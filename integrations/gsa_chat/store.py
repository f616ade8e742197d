"""Chat sessions in SQLite: one file per user, every message committed as soon as it exists.

Why SQLite in WAL mode: a reply is written while it streams (the row is created when generation starts
and its text updated as it grows), so a crash or a killed process mid-reply loses at most the last
few tokens and never an earlier message; WAL lets ``gsa logs`` read while a chat writes. The schema
version lives in ``PRAGMA user_version`` and :data:`MIGRATIONS` brings an older file up to date.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsa_core.errors import GSAError

DB_NAME = "chat.sqlite3"
ROLES = ("system", "user", "assistant")
#: ``streaming`` while a reply is produced (left so by a crash), then ``done`` (ended by the model, a
#: stop string or the token limit), ``stopped`` (Ctrl+C, partial text kept) or ``replaced`` (by /regen).
STATUSES = ("streaming", "done", "stopped", "replaced")

#: ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT UNIQUE,
        model TEXT NOT NULL DEFAULT '',
        template TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}',
        system TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'done'
            CHECK (status IN ('streaming', 'done', 'stopped', 'replaced')),
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_session ON messages(session_id, id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class SessionNotFoundError(GSAError):
    """``/load`` or ``--session`` named a session that does not exist."""


@dataclass
class Message:
    id: int
    session_id: int
    role: str
    content: str
    status: str
    created_at: float


@dataclass
class Session:
    id: int
    name: str | None
    model: str
    template: str
    settings: dict[str, Any]
    system: str
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"#{self.id}" + (f" ({self.name})" if self.name else "")


def default_path() -> Path:
    """The per-user database (``$GSA_HOME/data/chat.sqlite3`` when ``GSA_HOME`` is set)."""
    from gsa_data.paths import data_dir

    return data_dir() / DB_NAME


class Store:
    """The session database. Every write commits at once (autocommit), so nothing waits in memory."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process crashes
        self._migrate()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise GSAError(f"{self.path} has schema version {version}, newer than this gsa understands "
                           f"({SCHEMA_VERSION}); upgrade gaussian-splat-attention")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self.conn.executescript(f"BEGIN; {MIGRATIONS[target - 1]} PRAGMA user_version = {target}; COMMIT;")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # sessions ------------------------------------------------------------------------------------
    def create_session(self, *, model: str = "", template: str = "", settings: dict[str, Any] | None = None,
                       system: str = "") -> Session:
        now = time.time()
        cur = self.conn.execute(
            "INSERT INTO sessions (model, template, settings, system, created_at, updated_at) VALUES (?,?,?,?,?,?)",
            (model, template, json.dumps(settings or {}), system, now, now),
        )
        return self.session(cur.lastrowid)

    def update_session(self, session_id: int, **fields: Any) -> None:
        allowed = {"name", "model", "template", "settings", "system"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown session fields {sorted(unknown)}; valid: {sorted(allowed)}")
        if "settings" in fields:
            fields["settings"] = json.dumps(fields["settings"])
        if "name" in fields and fields["name"] is not None:
            self._check_name_free(fields["name"], session_id)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE sessions SET {sets}, updated_at = ? WHERE id = ?",
                          (*fields.values(), time.time(), session_id))

    def _check_name_free(self, name: str, session_id: int) -> None:
        row = self.conn.execute("SELECT id FROM sessions WHERE name = ? AND id != ?", (name, session_id)).fetchone()
        if row is not None:
            raise GSAError(f"the name {name!r} is already used by session #{row['id']}; choose another name")

    def session(self, key: int | str, *, with_messages: bool = True) -> Session:
        """A session by id (``12``, ``"12"``, ``"#12"``) or by name."""
        row = None
        text = str(key).strip()
        if text.lstrip("#").isdigit():
            row = self.conn.execute("SELECT * FROM sessions WHERE id = ?", (int(text.lstrip("#")),)).fetchone()
        if row is None:
            row = self.conn.execute("SELECT * FROM sessions WHERE name = ?", (text,)).fetchone()
        if row is None:
            known = [s.label for s in self.sessions(limit=10)]
            hint = f" Recent sessions: {', '.join(known)}." if known else " There are no saved sessions yet."
            raise SessionNotFoundError(f"no chat session with id or name {text!r}.{hint}")
        session = _session(row)
        if with_messages:
            session.messages = self.messages(session.id)
        return session

    def latest_session(self) -> Session | None:
        """The session written to most recently (``gsa chat --continue``)."""
        row = self.conn.execute("SELECT id FROM sessions ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return None if row is None else self.session(row["id"])

    def sessions(self, limit: int | None = None) -> list[Session]:
        """Sessions, most recently updated first, with their messages counted but not loaded."""
        sql = "SELECT * FROM sessions ORDER BY updated_at DESC, id DESC"
        rows = self.conn.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [_session(r) for r in rows]

    def message_count(self, session_id: int) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM messages WHERE session_id = ? AND status != 'replaced'",
                                 (session_id,)).fetchone()[0]

    # messages ------------------------------------------------------------------------------------
    def add_message(self, session_id: int, role: str, content: str, status: str = "done") -> int:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        now = time.time()
        cur = self.conn.execute(
            "INSERT INTO messages (session_id, role, content, status, created_at) VALUES (?,?,?,?,?)",
            (session_id, role, content, status, now),
        )
        self.conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))
        return int(cur.lastrowid)

    def update_message(self, message_id: int, *, content: str | None = None, status: str | None = None) -> None:
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        if content is not None:
            self.conn.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
        if status is not None:
            self.conn.execute("UPDATE messages SET status = ? WHERE id = ?", (status, message_id))

    def messages(self, session_id: int, *, include_replaced: bool = False) -> list[Message]:
        where = "" if include_replaced else " AND status != 'replaced'"
        rows = self.conn.execute(f"SELECT * FROM messages WHERE session_id = ?{where} ORDER BY id",
                                 (session_id,)).fetchall()
        return [Message(**dict(r)) for r in rows]

    def journal_mode(self) -> str:
        return str(self.conn.execute("PRAGMA journal_mode").fetchone()[0])

    def user_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])


def _session(row: sqlite3.Row) -> Session:
    data = dict(row)
    data["settings"] = json.loads(data["settings"] or "{}")
    return Session(**data)


def session_dict(session: Session, messages: Sequence[Message] | None = None) -> dict[str, Any]:
    """A session as plain JSON data (``gsa logs --json``)."""
    out: dict[str, Any] = {
        "id": session.id, "name": session.name, "model": session.model, "template": session.template,
        "settings": session.settings, "system": session.system,
        "created_at": session.created_at, "updated_at": session.updated_at,
    }
    if messages is not None:
        out["messages"] = [{"id": m.id, "role": m.role, "content": m.content, "status": m.status,
                            "created_at": m.created_at} for m in messages]
    return out
