"""``gsa chat`` driven through a pseudo-terminal, then the SQLite database checked.

Each test runs the real installed ``gsa`` program on a tiny local model (no download) with
``GSA_HOME`` pointing at a temporary folder, types a transcript, and reads the streamed text back.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import pexpect
import pytest
from _chat_models import build_chat_model
from gsa_chat.store import Store
from gsa_cli.main import main

GSA = str(Path(sys.executable).parent / "gsa")
PROMPT = "\r\n> "


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat_models")
    return {"small": build_chat_model(root / "small"), "endless": build_chat_model(root / "endless", endless=True)}


def env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), "GSA_HOME": str(home), "NO_COLOR": "1", "TERM": "dumb",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _as_a_terminal_session() -> None:
    """In the child, before exec: Ctrl+C as in a terminal session. A test run launched in the background
    (``cmd &`` without job control) ignores SIGINT, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def terminal(*args: str, home: Path) -> pexpect.spawn:
    return pexpect.spawn(GSA, list(args), env=env(home), encoding="utf-8", timeout=60, dimensions=(40, 250),
                         preexec_fn=_as_a_terminal_session)


def spawn(home: Path, *args: str) -> pexpect.spawn:
    child = terminal("chat", *args, home=home)
    child.expect_exact("/help lists commands")
    child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Type a line; return what was printed before the next prompt (without the echoed line and last newline)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").split("\n", 1)[1] if "\n" in child.before.replace("\r\n", "\n") else ""


def reply_text(printed: str) -> str:
    """The streamed reply in what ``say`` returned: everything before the trailing newline and notes."""
    return printed.split("\n[", 1)[0]


def db(home: Path) -> Store:
    return Store(home / "data" / "chat.sqlite3")


def test_transcript_commands_and_database(tmp_path: Path, models: dict[str, Path], capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    child = spawn(tmp_path, str(models["small"]), "--set", "max_new_tokens=8", "--set", "seed=0")
    first = reply_text(say(child, "Once upon a time"))
    assert first
    assert say(child, "/set temperature 0.5") == "temperature = 0.5"
    bad = say(child, "/set temperature hot")
    assert "error: bad value for temperature: 'hot'; expected a number from 0 to 5" in bad
    assert "temperature is still 0.5" in bad
    assert "unknown setting 'temprature'. Did you mean 'temperature'?" in say(child, "/set temprature 1")
    unknown = say(child, "/frob")
    assert "error: unknown command /frob." in unknown and "/regen" in unknown and "/history" in unknown
    assert say(child, "/system Be brief.") == "system prompt set"
    note, regenerated = say(child, "/regen").split("\n", 1)
    assert note.startswith("(seed is fixed at 0")
    second = reply_text(regenerated)
    child.sendline("line one \\")
    child.expect_exact("\r\n... ")
    third = reply_text(say(child, "line two"))
    child.sendline('"""')
    child.expect_exact("\r\n... ")
    child.sendline("block a")
    child.expect_exact("\r\n... ")
    fourth = reply_text(say(child, '"""'))
    history = say(child, "/history")
    assert "user: Once upon a time\nsystem: Be brief.\nassistant: " in history
    assert "user: line one \nline two\n" in history and "user: block a" in history
    helped = say(child, "/help")
    for usage in ("/exit, /bye", "/reset", "/regen", "/set PARAM VALUE", "/system TEXT", "/save NAME",
                  "/load ID|NAME", "/history", "/help"):
        assert usage in helped
    assert say(child, "/save story") == "saved as #1 (story)"
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    with db(tmp_path) as store:
        (session,) = store.sessions()
        assert (session.name, session.system, session.template) == ("story", "Be brief.", "plain")
        assert session.settings["temperature"] == 0.5 and session.settings["max_new_tokens"] == 8
        rows = [(m.role, m.content, m.status) for m in store.messages(session.id, include_replaced=True)]
    assert rows == [
        ("user", "Once upon a time", "done"), ("assistant", first, "replaced"), ("system", "Be brief.", "done"),
        ("assistant", second, "done"), ("user", "line one \nline two", "done"), ("assistant", third, "done"),
        ("user", "block a", "done"), ("assistant", fourth, "done"),
    ]

    monkeypatch.setenv("GSA_HOME", str(tmp_path))  # gsa logs in-process: a second program start costs seconds
    assert main(["logs", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["name"], s["messages"]) for s in data["sessions"]] == [(1, "story", 7)]


@pytest.mark.slow  # a third terminal session; the same paths run in-process in test_chat_script.py
def test_continue_load_and_ctrl_d(tmp_path: Path, models: dict[str, Path]) -> None:
    with db(tmp_path) as store:
        alpha = store.create_session(model="m", template="plain", settings={"max_new_tokens": 5})
        store.update_session(alpha.id, name="alpha")
        store.add_message(alpha.id, "user", "hello alpha")
        store.add_message(alpha.id, "assistant", "reply alpha")
        time.sleep(0.01)
        beta = store.create_session(model="m", template="plain", settings={"max_new_tokens": 5, "seed": 1})
        store.add_message(beta.id, "user", "hello beta")
        store.add_message(beta.id, "assistant", "reply beta", status="stopped")
    child = terminal("chat", str(models["small"]), "--continue", home=tmp_path)
    child.expect_exact(f"continuing session #{beta.id} (2 messages")
    child.expect_exact(PROMPT)
    assert "user: hello beta\nassistant [stopped]: reply beta" in say(child, "/history")
    missing = say(child, "/load nope")
    assert "error: no chat session with id or name 'nope'" in missing and "#1 (alpha)" in missing
    loaded = say(child, "/load alpha")
    assert f"loaded session #{alpha.id} (alpha) (2 messages)" in loaded and "assistant: reply alpha" in loaded
    reply = reply_text(say(child, "more"))
    child.sendeof()  # Ctrl+D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    with db(tmp_path) as store:
        assert [(m.role, m.content) for m in store.messages(alpha.id)] == [
            ("user", "hello alpha"), ("assistant", "reply alpha"), ("user", "more"), ("assistant", reply)]
        assert len(store.messages(beta.id)) == 2


def test_ctrl_c_keeps_the_partial_reply_and_a_crash_loses_nothing_earlier(tmp_path: Path,
                                                                          models: dict[str, Path]) -> None:
    child = spawn(tmp_path, str(models["endless"]), "--set", "max_new_tokens=3000", "--set", "seed=0")
    child.logfile_read = transcript = io.StringIO()
    child.sendline("Once")
    child.expect_exact("Once\r\n")
    child.expect(r"\S{4}")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped: the partial reply is kept]")
    shown = transcript.getvalue().split("Once\r\n", 1)[1].split("\r\n[stopped", 1)[0]
    partial = shown.replace("^C", "").replace("\r\n", "\n")  # the terminal echoes Ctrl+C as ^C
    child.expect_exact(PROMPT)
    child.sendintr()  # at the prompt: clears the line, the session goes on
    child.expect_exact("(Ctrl+C clears the line; /exit or Ctrl+D quits)")
    child.expect_exact(PROMPT)
    assert say(child, "/set max_new_tokens 4") == "max_new_tokens = 4"
    short = reply_text(say(child, "again"))
    say(child, "/set max_new_tokens 3000")
    child.sendline("crash")
    child.expect_exact("crash\r\n")
    child.expect(r"\S{4}")
    time.sleep(0.6)  # longer than the flush interval, so some of the reply is already stored
    child.kill(signal.SIGKILL)
    child.close(force=True)

    with db(tmp_path) as store:
        (session,) = store.sessions()
        rows = [(m.role, m.content, m.status) for m in store.messages(session.id)]
    assert rows[:4] == [("user", "Once", "done"), ("assistant", partial, "stopped"), ("user", "again", "done"),
                        ("assistant", short, "done")]
    assert len(partial) > 0 and len(partial) < 3000 * 4
    assert rows[4] == ("user", "crash", "done")
    assert rows[5][0] == "assistant" and rows[5][2] == "streaming" and rows[5][1]


def test_bad_model_and_bad_template_exit_with_one_message(tmp_path: Path, models: dict[str, Path], capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GSA_HOME", str(tmp_path))
    assert main(["chat", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["chat", str(models["small"]), "--template", "tinystory"]) == 2
    err = capsys.readouterr().err
    assert "unknown template 'tinystory'" in err and "tinystories-instruct" in err
    assert main(["chat", str(models["small"]), "--set", "temperature"]) == 2
    assert "--set takes PARAM=VALUE" in capsys.readouterr().err
