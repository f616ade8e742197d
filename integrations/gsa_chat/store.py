"""Chat sessions in SQLite: one file per user, every message committed as soon as it exists.

Why SQLite in WAL mode: a reply is written while it streams (the row is created when generation starts
and its text updated as it grows), so a crash or a killed process mid-reply loses at most the last
few tokens and never an earlier message; WAL lets ``gsa logs`` read while a chat writes. The schema
version lives in ``PRAGMA user_version`` and :data:`MIGRATIONS` brings an older file up to date.

The file is private to the user (0600, as SQLite gives its ``-wal``/``-shm`` files the database's
mode), and every way it can be unusable (damaged, truncated, another program's database, read-only,
locked) is one :class:`StoreError` naming the file and what to do, never a ``sqlite3`` traceback.
``gsa logs`` opens it read-only (``read_only=True``) and so never changes or creates it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gsa_data.files import PRIVATE_FILE_MODE, make_private

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
#: Columns each table must have for a file to count as a gsa chat database.
REQUIRED_COLUMNS = {"sessions": {"id", "name", "model", "template", "settings", "system", "created_at", "updated_at"},
                    "messages": {"id", "session_id", "role", "content", "status", "created_at"}}
MAX_ID = 2**63 - 1  # SQLite's INTEGER


class SessionNotFoundError(GSAError):
    """``/load`` or ``--session`` named a session that does not exist."""


class StoreError(GSAError):
    """The chat database cannot be used: damaged, foreign, read-only, locked or out of space."""


def _advice(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text or "disk i/o" in text:
        return "it is damaged or not a gsa chat database: move it away and gsa starts a new one"
    if "readonly" in text or "read-only" in text:
        return "it is read-only: fix its permissions (and its folder's), or use GSA_HOME to choose another place"
    if "locked" in text or "busy" in text:
        return "another program holds it locked: close the other gsa chat and try again"
    if "full" in text:
        return "the disk is full: free some space"
    if "unable to open" in text:
        return "it cannot be opened: check that it and its folder exist and are readable"
    return "move it away and gsa starts a new one"


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


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_header(path: Path) -> None:
    """A non-empty file must start as an SQLite database: SQLite itself would take a short file of any bytes
    for an empty database and overwrite it."""
    with open(path, "rb") as handle:
        head = handle.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        raise sqlite3.DatabaseError("file is not a database")


class Store:
    """The session database. Every write commits at once (autocommit), so nothing waits in memory.

    ``read_only``: open an existing file for reading only (no migration, nothing created or changed).
    """

    def __init__(self, path: str | Path | None = None, *, read_only: bool = False):
        self.path = Path(path) if path is not None else default_path()
        self.read_only = read_only
        self.conn: sqlite3.Connection | None = None
        with self._errors("open"):
            self.conn = self._connect_read_only() if read_only else self._connect_read_write()
            self.conn.row_factory = sqlite3.Row
            version = self._check_schema()  # before anything is written: another program's file stays as it is
            if not read_only:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA foreign_keys=ON")
                self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process crashes
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    self.conn.executescript(f"BEGIN; {MIGRATIONS[target - 1]} PRAGMA user_version = {target}; "
                                            "COMMIT;")

    def _connect_read_write(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # created private; SQLite gives -wal/-shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
        for suffix in ("", "-wal", "-shm"):  # tighten a file made by an older version (0644)
            make_private(self.path.with_name(self.path.name + suffix))
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        _check_header(self.path)
        return sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=False)

    def _connect_read_only(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise sqlite3.OperationalError("unable to open database file")
        _check_header(self.path)
        uri = f"file:{quote(str(self.path.resolve()))}"
        try:
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as exc:  # a WAL file in a folder we cannot write: read the file as it is
            if "not a database" in str(exc):
                raise
            return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None,
                                   check_same_thread=False)

    def _check_schema(self) -> int:
        """The file's schema version, after checking (reading only) that it is a gsa chat database."""
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this gsa understands "
                             f"({SCHEMA_VERSION}); upgrade gaussian-splat-attention")
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and tables - {"sqlite_sequence"}:
            raise StoreError(f"{self.path} is an SQLite database of another program (tables: "
                             f"{', '.join(sorted(tables))}), not a gsa chat database: move it away, or set GSA_HOME "
                             "to use another folder")
        if version > 0:
            for table, needed in REQUIRED_COLUMNS.items():
                have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
                if not needed <= have:
                    raise StoreError(f"{self.path} is not a gsa chat database (table {table!r} lacks "
                                     f"{', '.join(sorted(needed - have))}): move it away and gsa starts a new one")
        return version

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """``sqlite3`` errors inside become one :class:`StoreError` naming the file and what to do."""
        try:
            yield
        except sqlite3.Error as exc:
            if self.conn is not None and action == "open":
                self.conn.close()
            raise StoreError(f"cannot {action} the chat database {self.path}: {exc}; {_advice(exc)}") from None

    def _sql(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._errors("write"):
            return self.conn.execute(sql, params)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._errors("read"):
            return self.conn.execute(sql, params).fetchall()

    def _empty(self) -> bool:
        """A read-only view of a file that has no tables yet (no sessions)."""
        return self.read_only and self.user_version() == 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # sessions ------------------------------------------------------------------------------------
    def create_session(self, *, model: str = "", template: str = "", settings: dict[str, Any] | None = None,
                       system: str = "") -> Session:
        now = time.time()
        cur = self._sql(
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
        self._sql(f"UPDATE sessions SET {sets}, updated_at = ? WHERE id = ?",
                  (*fields.values(), time.time(), session_id))

    def _check_name_free(self, name: str, session_id: int) -> None:
        row = next(iter(self._rows("SELECT id FROM sessions WHERE name = ? AND id != ?", (name, session_id))), None)
        if row is not None:
            raise GSAError(f"the name {name!r} is already used by session #{row['id']}; choose another name")

    def session(self, key: int | str, *, with_messages: bool = True) -> Session:
        """A session by id (``12``, ``"12"``, ``"#12"``) or by name."""
        row = None
        text = str(key).strip()
        if self._empty():
            raise SessionNotFoundError(f"no chat session with id or name {text!r}. There are no saved sessions yet.")
        digits = text.lstrip("#")
        if digits.isascii() and digits.isdigit() and len(digits) < 20 and int(digits) <= MAX_ID:
            row = next(iter(self._rows("SELECT * FROM sessions WHERE id = ?", (int(digits),))), None)
        if row is None:
            row = next(iter(self._rows("SELECT * FROM sessions WHERE name = ?", (text,))), None)
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
        if self._empty():
            return None
        row = next(iter(self._rows("SELECT id FROM sessions ORDER BY updated_at DESC, id DESC LIMIT 1")), None)
        return None if row is None else self.session(row["id"])

    def sessions(self, limit: int | None = None) -> list[Session]:
        """Sessions, most recently updated first, with their messages counted but not loaded."""
        if self._empty():
            return []
        sql = "SELECT * FROM sessions ORDER BY updated_at DESC, id DESC"
        rows = self._rows(sql + (" LIMIT ?" if limit else ""), (min(limit, MAX_ID),) if limit else ())
        return [_session(r) for r in rows]

    def message_count(self, session_id: int) -> int:
        return self._rows("SELECT COUNT(*) FROM messages WHERE session_id = ? AND status != 'replaced'",
                          (session_id,))[0][0]

    # messages ------------------------------------------------------------------------------------
    def add_message(self, session_id: int, role: str, content: str, status: str = "done") -> int:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        now = time.time()
        cur = self._sql(
            "INSERT INTO messages (session_id, role, content, status, created_at) VALUES (?,?,?,?,?)",
            (session_id, role, content, status, now),
        )
        self._sql("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))
        return int(cur.lastrowid)

    def update_message(self, message_id: int, *, content: str | None = None, status: str | None = None) -> None:
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        if content is not None:
            self._sql("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
        if status is not None:
            self._sql("UPDATE messages SET status = ? WHERE id = ?", (status, message_id))

    def messages(self, session_id: int, *, include_replaced: bool = False) -> list[Message]:
        where = "" if include_replaced else " AND status != 'replaced'"
        rows = self._rows(f"SELECT * FROM messages WHERE session_id = ?{where} ORDER BY id", (session_id,))
        return [Message(**dict(r)) for r in rows]

    def journal_mode(self) -> str:
        return str(self._rows("PRAGMA journal_mode")[0][0])

    def user_version(self) -> int:
        return int(self._rows("PRAGMA user_version")[0][0])


def _session(row: sqlite3.Row) -> Session:
    data = dict(row)
    try:  # a hand-edited or damaged row: its session still opens, with default settings
        settings = json.loads(data["settings"] or "{}")
    except (ValueError, TypeError):
        settings = {}
    data["settings"] = settings if isinstance(settings, dict) else {}
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
