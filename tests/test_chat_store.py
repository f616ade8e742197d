"""The chat session database: WAL, schema version, lookups, and messages that survive a killed process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gsa_chat.store import SCHEMA_VERSION, SessionNotFoundError, Store, default_path
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.errors import GSAError


def test_wal_mode_and_user_version(tmp_path: Path) -> None:
    with Store(tmp_path / "c.sqlite3") as store:
        assert store.journal_mode() == "wal"
        assert store.user_version() == SCHEMA_VERSION >= 1
    raw = sqlite3.connect(tmp_path / "c.sqlite3")  # a fresh connection sees the persisted settings
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sessions", "messages"} <= tables


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with Store(path) as store:
        sid = store.create_session(model="m").id
        store.add_message(sid, "user", "hello")
    with Store(path) as store:
        assert [m.content for m in store.messages(sid)] == ["hello"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(GSAError, match="newer than this gsa understands"):
        Store(path)


def test_default_path_honours_gsa_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GSA_HOME", str(tmp_path))
    assert default_path() == tmp_path / "data" / "chat.sqlite3"


def test_sessions_by_id_or_name_latest_and_replaced(tmp_path: Path) -> None:
    with Store(tmp_path / "c.sqlite3") as store:
        a = store.create_session(model="m", template="plain", settings={"temperature": 0.5})
        b = store.create_session(model="m")
        store.update_session(a.id, name="first")
        store.add_message(a.id, "user", "hi")  # touching a makes it the latest
        assert store.latest_session().id == a.id
        assert store.session("first").id == store.session(str(a.id)).id == store.session(f"#{a.id}").id == a.id
        assert store.session(a.id).settings == {"temperature": 0.5}
        reply = store.add_message(a.id, "assistant", "x")
        store.update_message(reply, status="replaced")
        assert [m.role for m in store.messages(a.id)] == ["user"]
        assert len(store.messages(a.id, include_replaced=True)) == 2
        with pytest.raises(GSAError, match="already used by session"):
            store.update_session(b.id, name="first")
        with pytest.raises(SessionNotFoundError, match=r"no chat session with id or name 'nope'.*#1 \(first\)"):
            store.session("nope")
        with pytest.raises(ValueError, match="valid roles"):
            store.add_message(a.id, "robot", "x")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=40)), max_size=8))
def test_messages_round_trip_in_order(tmp_path_factory: pytest.TempPathFactory, messages: list) -> None:
    with Store(tmp_path_factory.mktemp("db") / "c.sqlite3") as store:
        sid = store.create_session().id
        for role, content in messages:
            store.add_message(sid, role, content)
        assert [(m.role, m.content) for m in store.messages(sid)] == messages


CRASH = textwrap.dedent("""
    import os, signal, sys
    from gsa_chat.store import Store
    store = Store(sys.argv[1])
    sid = store.create_session(model="m").id
    store.add_message(sid, "user", "tell me a story")
    reply = store.add_message(sid, "assistant", "", status="streaming")
    store.update_message(reply, content="Once upon")
    os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-reply: nothing is closed or flushed by Python
""")


def test_messages_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(path)], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    with Store(path) as store:
        (session,) = store.sessions()
        messages = store.messages(session.id)
    assert [(m.role, m.content, m.status) for m in messages] == [
        ("user", "tell me a story", "done"), ("assistant", "Once upon", "streaming")]
