"""``gsa chat --script``, the scripted demo, ``gsa logs``, and multi-line input, run in-process."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from _chat_models import build_chat_model
from gsa_chat.demo import DEMO_SCRIPT, run_demo
from gsa_chat.models import load_chat_model
from gsa_chat.repl import Output, read_message, sigint_sets
from gsa_chat.sampling import SamplingSettings
from gsa_chat.session import ChatSession
from gsa_chat.store import Store
from gsa_cli.main import main
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("chat_model"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GSA_HOME", str(tmp_path))
    return tmp_path


def lines_reader(lines: list[str]):
    queue = list(lines)

    def read_line(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read_line


def test_multi_line_input_forms() -> None:
    assert read_message(lines_reader(["a \\", "b\\", "c"])) == "a \nb\nc"
    assert read_message(lines_reader(['"""', "x", "", "  y", '"""', "after"])) == "x\n\n  y"
    assert read_message(lines_reader(["ends in a real backslash \\\\"])) == "ends in a real backslash \\\\"
    with pytest.raises(EOFError):
        read_message(lines_reader(['"""', "never closed"]))


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30)
       .filter(lambda s: not s.endswith("\\") and s.strip() != '"""'))
def test_a_plain_line_is_one_message(line: str) -> None:
    assert read_message(lines_reader([line, "next"])) == line


def test_script_runs_a_conversation_and_logs_show_it(home: Path, model_dir: Path, capsys) -> None:
    script = home / "talk.txt"
    script.write_text("Once upon a time\n/set top_k 5\n/save scripted\n/history\n", encoding="utf-8")
    assert main(["chat", str(model_dir), "--script", str(script), "--set", "max_new_tokens=4", "--set", "seed=2",
                 "--system", "sys"]) == 0
    out = capsys.readouterr().out
    assert "> Once upon a time\n" in out and "top_k = 5" in out and "saved as #1 (scripted)" in out
    with Store(home / "data" / "chat.sqlite3") as store:
        session = store.session("scripted")
    assert [m.role for m in session.messages] == ["user", "assistant"]
    assert session.settings["top_k"] == 5 and session.system == "sys"
    assert f"assistant: {session.messages[1].content}" in out

    assert main(["logs", "show", "scripted", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [m["content"] for m in shown["messages"]] == [m.content for m in session.messages]
    assert main(["logs"]) == 0
    assert "scripted" in capsys.readouterr().out
    assert main(["logs", "show"]) == 2
    assert "gsa logs show needs a session id or name" in capsys.readouterr().err
    assert main(["logs", "show", "nope"]) == 2
    assert "no chat session with id or name 'nope'" in capsys.readouterr().err


def test_continue_restores_the_latest_session_and_load_switches(home: Path, model_dir: Path, capsys) -> None:
    with Store(home / "data" / "chat.sqlite3") as store:
        alpha = store.create_session(model="m", template="plain", settings={"max_new_tokens": 3})
        store.update_session(alpha.id, name="alpha")
        store.add_message(alpha.id, "user", "hello alpha")
        beta = store.create_session(model="m", template="plain", settings={"top_k": 7})
        store.add_message(beta.id, "user", "hello beta")
    script = home / "s.txt"
    script.write_text("/history\n/set\n/load alpha\nmore\n/exit\nnot reached\n", encoding="utf-8")
    assert main(["chat", str(model_dir), "--continue", "--script", str(script)]) == 0
    out = capsys.readouterr().out
    assert f"continuing session #{beta.id} (1 messages" in out and "user: hello beta" in out and "top_k = 7" in out
    assert f"loaded session #{alpha.id} (alpha)" in out and "> not reached" not in out
    with Store(home / "data" / "chat.sqlite3") as store:
        assert [m.content for m in store.messages(alpha.id)][:2] == ["hello alpha", "more"]
        assert store.session("alpha").settings["max_new_tokens"] == 3
    assert main(["chat", str(model_dir), "--session", "alpha", "--script", str(home / "s.txt")]) == 0
    assert f"continuing session #{alpha.id} (alpha) (3 messages" in capsys.readouterr().out


def test_sigint_during_a_reply_stops_it_and_keeps_the_text(home: Path, tmp_path_factory) -> None:
    chat_model = load_chat_model(build_chat_model(tmp_path_factory.mktemp("endless"), endless=True))
    store = Store(home / "c.sqlite3")
    chat = ChatSession.start(store, chat_model, settings=SamplingSettings(max_new_tokens=3000, seed=0))
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl+C does

    stop = threading.Event()
    with sigint_sets(stop):
        reply = chat.send("Once", on_text=on_text, interrupt=stop)
    assert reply.finish_reason == "interrupted" and reply.new_tokens < 3000
    last = store.messages(chat.session.id)[-1]
    assert (last.content, last.status) == (reply.text, "stopped") and reply.text == "".join(pieces)
    store.close()


def test_continue_with_nothing_saved_starts_a_new_session(home: Path, model_dir: Path, capsys) -> None:
    script = home / "s.txt"
    script.write_text("/history\n", encoding="utf-8")
    assert main(["chat", str(model_dir), "--continue", "--script", str(script)]) == 0
    out = capsys.readouterr().out
    assert "no saved session to continue; starting a new one" in out and "(no messages yet)" in out


def test_demo_script_on_a_given_model(home: Path, model_dir: Path, capsys) -> None:
    store = Store(home / "demo.sqlite3")
    assert run_demo(load_chat_model(model_dir), store, out=Output()) == 0
    out = capsys.readouterr().out
    for line in DEMO_SCRIPT:
        assert f"> {line}\n" in out
    session = store.sessions()[0]
    messages = store.messages(session.id, include_replaced=True)
    assert [(m.role, m.status) for m in messages] == [("user", "done"), ("assistant", "replaced"),
                                                      ("assistant", "done"), ("user", "done"), ("assistant", "done")]
    assert f"gsa logs show {session.id}" in out
    store.close()


def test_chat_on_a_converted_gsa_checkpoint(home: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsa_plugins.adapters import convert, is_converted

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    convert(model, {"bank": {"n_splats": 4}, "backend": "kernel",
                    "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}})
    folder = tmp_path / "gsa_model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    loaded = load_chat_model(folder)
    assert is_converted(loaded.model)
    script = tmp_path / "s.txt"
    script.write_text("Once upon a time\n", encoding="utf-8")
    assert main(["chat", str(folder), "--script", str(script), "--set", "max_new_tokens=5"]) == 0
    with Store(home / "data" / "chat.sqlite3") as store:
        (session,) = store.sessions()
        assert [m.role for m in store.messages(session.id)] == ["user", "assistant"]


def test_no_model_means_the_embedded_default(home: Path, model_dir: Path, monkeypatch, capsys) -> None:
    import gsa_train.reference

    calls: list[bool] = []
    monkeypatch.setattr(gsa_train.reference, "default_chat_model", lambda progress=True: calls.append(progress)
                        or model_dir)
    script = home / "s.txt"
    script.write_text("hello\n", encoding="utf-8")
    assert main(["chat", "--script", str(script), "--set", "max_new_tokens=3"]) == 0
    assert calls == [True] and f"gsa chat: {model_dir}" in capsys.readouterr().out


def test_control_characters_in_model_text_are_not_sent_to_the_terminal(capsys) -> None:
    out = Output()
    out.text("a\x1b[2Jb\n")
    out.note("assistant: c\x07d\te")
    assert capsys.readouterr().out == "a\ufffd[2Jb\nassistant: c\ufffdd\te\n"


@pytest.mark.slow  # trains the reference model for a few steps in a private GSA_HOME
def test_gsa_chat_demo_on_the_trained_default(home: Path, capsys) -> None:
    from gsa_train.reference import default_chat_model

    default_chat_model(progress=False, steps=3)  # the cache the demo then finds
    assert main(["chat", "--demo"]) == 0
    out = capsys.readouterr().out
    assert "> Return a new list\n" in out and "gsa logs show 1" in out
    with Store(home / "data" / "chat.sqlite3") as store:
        roles = [m.role for m in store.session("1").messages]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_resume_falls_back_with_a_note_when_the_saved_session_does_not_fit(home: Path, model_dir: Path) -> None:
    store = Store(home / "c.sqlite3")
    saved = store.create_session(model="elsewhere", template="chat-template", settings={"temperature": 99})
    chat, notes = ChatSession.resume(store, load_chat_model(model_dir), saved.id, {"top_k": "3"})
    assert chat.template.name == "plain" and chat.settings.temperature == SamplingSettings().temperature
    assert chat.settings.top_k == 3 and store.session(saved.id).settings["top_k"] == 3
    assert any("needs a tokenizer with a chat template" in n for n in notes)
    assert "the saved sampling settings were invalid; using the defaults" in notes
    assert any("recorded with elsewhere" in n for n in notes)
    store.close()
