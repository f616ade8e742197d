"""One error discipline (docs/safety.md): every bad input is exit status 2 and one line naming it, no traceback;
``--debug`` shows the traceback; limits stop what would exhaust the machine; nothing is lost or overwritten."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import _safety
import pytest
from _safety import DAMAGES, changed, damaged_copy, read_only, run_cli, snapshot, tiny_bert, tiny_neo
from _train_corpus import MICRO, write_corpus

TRAIN = _safety.TRAIN
DISTILL = [*_safety.DISTILL, "--stage1-steps", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    one_doc = base / "one-doc"
    one_doc.mkdir()
    (one_doc / "only.txt").write_text("A single document is all there is in this corpus, nothing to hold out.\n")
    return {"neo": tiny_neo(base / "neo"), "bert": tiny_bert(base / "bert"), "corpus": write_corpus(base / "corpus"),
            "one_doc": one_doc}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GSA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GSA_DEBUG", raising=False)
    return tmp_path / "home"


def expect_error(result, *parts: str) -> None:
    assert result.one_clear_line, result
    for part in parts:
        assert part in result.err, (part, result.err)


# ----------------------------------------------------------------------------- convert
@pytest.mark.parametrize("damage", DAMAGES)
def test_convert_a_damaged_source_is_one_message(models, tmp_path, capsys, damage):
    src = damaged_copy(models["neo"], tmp_path / "src", damage)
    before = snapshot(tmp_path)
    expect_error(run_cli(capsys, "convert", src, tmp_path / "dst"), str(src))
    assert not changed(before, snapshot(tmp_path)) and not (tmp_path / "dst").exists()


@pytest.mark.parametrize("case", ["nonexistent", "not-a-model", "a-file"])
def test_convert_a_source_that_is_no_model_folder(models, tmp_path, capsys, case):
    src = tmp_path / "src"
    if case == "not-a-model":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
    elif case == "a-file":
        src.write_text("hello")
    expect_error(run_cli(capsys, "convert", src, tmp_path / "dst"), str(src))


def test_convert_never_overwrites_its_source_or_a_full_folder(models, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(models["neo"], src)
    (tmp_path / "link").symlink_to(src)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    expect_error(run_cli(capsys, "convert", src, src), "overwrite the source")
    expect_error(run_cli(capsys, "convert", src, tmp_path / "link"), "overwrite the source")
    expect_error(run_cli(capsys, "convert", tmp_path / "link", tmp_path / "sub" / ".." / "src"), "overwrite the source")
    expect_error(run_cli(capsys, "convert", src, full), "not empty", "--force")
    (tmp_path / "a-file").write_text("x")
    expect_error(run_cli(capsys, "convert", src, tmp_path / "a-file"), "is a file")
    assert not changed(before, snapshot(tmp_path))
    assert json.loads((src / "config.json").read_text())["model_type"] == "gpt_neo"
    result = run_cli(capsys, "convert", src, full, "--force")  # with --force: written, other files kept
    assert result.code == 0, result.err
    assert (full / "keep.txt").read_text() == "mine"
    assert json.loads((full / "config.json").read_text())["model_type"] == "gsa_gpt_neo"
    assert not [p for p in full.iterdir() if p.name.startswith(".partial")]


def test_convert_into_a_read_only_folder_is_one_message(models, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        expect_error(run_cli(capsys, "convert", models["neo"], locked / "dst"), "not writable")


# ----------------------------------------------------------------------------- distill
@pytest.mark.parametrize("case", ["not-a-model", "truncated"])
def test_distill_a_bad_source_is_one_message(models, tmp_path, capsys, case):
    if case == "truncated":
        src = damaged_copy(models["bert"], tmp_path / "src", "truncated-weights")
    else:
        src = tmp_path / "src"
        src.mkdir()
    expect_error(run_cli(capsys, "distill", src, tmp_path / "dst", "--corpus", models["corpus"], *DISTILL), str(src))
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(("args", "parts"), [
    (["--corpus", "/nonexistent/corpus"], ["unknown corpus", "/nonexistent/corpus"]),
    (["--seed", str(2**70)], ["seed", "less than or equal"]),
    (["--stage2", "none", "--stage2-steps", "5"], ["stage2_steps has no effect", "--stage2 lora or full"]),
    (["--stage2", "full", "--lora-rank", "4"], ["lora_rank", "LoRA settings"]),
    (["--max-length", "500"], ["max_length 500 exceeds the model's 64 positions"]),
])
def test_distill_bad_settings_are_one_message(models, tmp_path, capsys, args, parts):
    common = ["--batch-size", "4", "--calib-tokens", "200", "--no-progress", "--max-length", "32"]
    expect_error(run_cli(capsys, "distill", models["bert"], tmp_path / "dst", *common, *args), *parts)
    assert not (tmp_path / "dst").exists()


def test_distill_refuses_to_write_into_its_source(models, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(models["bert"], run / "model")
    before = snapshot(tmp_path)
    expect_error(run_cli(capsys, "distill", run / "model", run, "--force", *DISTILL), "overwrite the source")
    assert not changed(before, snapshot(tmp_path))


# ----------------------------------------------------------------------------- train
@pytest.mark.parametrize("case", ["tokenizer-nonexistent", "tokenizer-not-a-tokenizer", "out-a-file", "one-document",
                                  "corpus-a-file", "seed-too-large", "steps-too-large"])
def test_train_bad_inputs_are_one_message(models, tmp_path, capsys, case):
    out, args = tmp_path / "run", ["--corpus", str(models["corpus"]), "--steps", "1", *TRAIN]
    expected = {"tokenizer-nonexistent": "does not exist", "tokenizer-not-a-tokenizer": "holds no tokenizer",
                "out-a-file": "is a file", "one-document": "too small", "corpus-a-file": "is a file",
                "seed-too-large": "seed", "steps-too-large": "steps"}[case]
    if case == "tokenizer-nonexistent":
        args += ["--tokenizer", str(tmp_path / "nope")]
    elif case == "tokenizer-not-a-tokenizer":
        (tmp_path / "empty").mkdir()
        args += ["--tokenizer", str(tmp_path / "empty")]
    elif case == "out-a-file":
        out.write_text("x")
    elif case == "one-document":
        args[1] = str(models["one_doc"])
    elif case == "corpus-a-file":
        args[1] = str(models["one_doc"] / "only.txt")
    elif case == "seed-too-large":
        args += ["--seed", str(2**63)]
    else:
        args[3] = str(10**10)
    expect_error(run_cli(capsys, "train", "--out", out, *args), expected)


def test_train_micro_runs_with_its_default_block_length(models, tmp_path, capsys):
    result = run_cli(capsys, "train", "--out", tmp_path / "run", "--corpus", models["corpus"], "--layout", "micro",
                     "--vocab-size", "300", "--batch-size", "4", "--steps", "1", "--eval-blocks", "2", "--no-progress",
                     "--json")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "run" / "train.json").read_text())["settings"]["block_len"] == 64


def test_a_typo_never_destroys_a_checkpoint(models, tmp_path, capsys):
    from gsa_train.loop import train

    out = tmp_path / "run"
    train({**MICRO, "corpus": str(models["corpus"]), "out": out, "steps": 6, "checkpoint_every": 2, "stop_after": 2})
    before = snapshot(out)
    assert "checkpoint/state.pt" in before
    common = ["--out", out, "--steps", "6", *TRAIN]
    expect_error(run_cli(capsys, "train", "--corpus", tmp_path / "corpsu", *common), "unknown corpus")
    expect_error(run_cli(capsys, "train", "--corpus", models["corpus"], *common), "not empty", "--resume", "--force")
    expect_error(run_cli(capsys, "train", "--corpus", tmp_path / "corpsu", "--force", *common), "unknown corpus")
    assert not changed(before, snapshot(out))
    result = run_cli(capsys, "train", "--corpus", models["corpus"], "--resume", "--checkpoint-every", "2", *common)
    assert result.code == 0, result.err
    assert json.loads((out / "train.json").read_text())["resumed_from"] == 2


def test_train_checkpoints_by_default(models, tmp_path):
    from gsa_train.loop import TrainSettings

    assert TrainSettings(out=tmp_path).checkpoint_every > 0


# ----------------------------------------------------------------------------- config
def test_config_limits(tmp_path, capsys):
    (tmp_path / "splats.toml").write_text("[bank]\nn_splats = 1e9\n")
    expect_error(run_cli(capsys, "config", "validate", tmp_path / "splats.toml"), "n_splats", "65536")
    (tmp_path / "seed.json").write_text(json.dumps({"seed": 2**70}))
    expect_error(run_cli(capsys, "config", "validate", tmp_path / "seed.json"), "seed")
    (tmp_path / "big.toml").write_text("".join(f"k{i} = 1\n" for i in range(200_000)))
    expect_error(run_cli(capsys, "config", "validate", tmp_path / "big.toml"), "larger than")
    levels, previous = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]'], "a"
    for i in range(1, 9):  # 9**9 values once expanded, in 500 bytes
        levels.append(f"b{i}: &b{i} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = f"b{i}"
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\nbank: {n_splats: 4}\n")
    expect_error(run_cli(capsys, "config", "validate", tmp_path / "bomb.yaml"), "YAML aliases")
    (tmp_path / "self.yaml").write_text("a: &a [*a]\n")
    expect_error(run_cli(capsys, "config", "validate", tmp_path / "self.yaml"), "refers to itself")


def test_error_messages_are_bounded(tmp_path, capsys):
    (tmp_path / "keys.toml").write_text("".join(f"unknown_key_{i} = 1\n" for i in range(2000)))
    result = run_cli(capsys, "config", "validate", tmp_path / "keys.toml")
    expect_error(result, "unknown_key_0", "more characters")
    assert len(result.err) < 1200


def test_non_utf8_config_and_script_are_one_message(models, tmp_path, capsys):
    (tmp_path / "latin.toml").write_bytes(b'backend = "dense"\n# caf\xe9\n')
    expect_error(run_cli(capsys, "config", "validate", tmp_path / "latin.toml"), "not UTF-8", "latin.toml")
    (tmp_path / "script.txt").write_bytes(b"caf\xe9\n")
    expect_error(run_cli(capsys, "chat", models["neo"], "--script", tmp_path / "script.txt"), "not UTF-8",
                 "script.txt")


def test_schema_to_a_folder_that_does_not_exist(tmp_path, capsys):
    expect_error(run_cli(capsys, "config", "schema", "--out", tmp_path / "nope" / "x.json"), "nope")


# ----------------------------------------------------------------------------- chat database and logs
def _db(home: Path) -> Path:
    return home / "data" / "chat.sqlite3"


@pytest.mark.parametrize("damage", ["random", "truncated", "one-byte", "foreign", "wrong-columns"])
def test_a_damaged_chat_database_is_one_message_everywhere(models, home, tmp_path, capsys, damage):
    script = tmp_path / "s.txt"
    script.write_text("hello\n")
    assert run_cli(capsys, "chat", models["neo"], "--script", script, "--set", "max_new_tokens=2").code == 0
    db = _db(home)
    for extra in ("-wal", "-shm"):
        Path(str(db) + extra).unlink(missing_ok=True)
    if damage == "random":
        db.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        db.write_bytes(db.read_bytes()[:1500])
    elif damage == "one-byte":  # SQLite alone would take it for an empty database and overwrite it (the fuzzer's find)
        db.write_bytes(b"x")
    else:
        db.unlink()
        raw = sqlite3.connect(db)
        if damage == "foreign":
            raw.execute("CREATE TABLE sessions (x)")
        else:
            raw.executescript("CREATE TABLE sessions (id INTEGER); CREATE TABLE messages (id INTEGER); "
                              "PRAGMA user_version = 1;")
        raw.commit()
        raw.close()
    before = snapshot(home)
    for args in (["logs"], ["logs", "show", "1"], ["logs", "--json"], ["chat", models["neo"], "--script", script]):
        result = run_cli(capsys, *args)
        expect_error(result, "chat.sqlite3")
    assert not changed(before, snapshot(home))


def test_logs_read_a_read_only_database_and_chat_says_so(models, home, tmp_path, capsys):
    script = tmp_path / "s.txt"
    script.write_text("hello\n")
    assert run_cli(capsys, "chat", models["neo"], "--script", script, "--set", "max_new_tokens=2").code == 0
    with read_only(_db(home)):
        listed = run_cli(capsys, "logs")
        assert listed.code == 0 and "#1" not in listed.err, listed
        expect_error(run_cli(capsys, "chat", models["neo"], "--script", script), "read-only")


def test_logs_limit_and_ids_out_of_range(home, capsys):
    expect_error(run_cli(capsys, "logs", "--limit", str(10**23)), "--limit")
    from gsa_chat.store import Store

    Store().close()
    expect_error(run_cli(capsys, "logs", "show", str(10**30)), "no chat session")


def test_logs_show_never_writes_terminal_control_sequences(home, capsys):
    from gsa_chat.store import Store

    with Store() as store:
        sid = store.create_session(model="m\x1b]0;title\x07").id
        store.add_message(sid, "user", "clear \x1b[2J\x1b[H screen\x9b and bell \x07 tab\tok")
    for args in (["logs"], ["logs", "show", str(sid)]):
        result = run_cli(capsys, *args)
        assert result.code == 0 and not any(c in result.out for c in "\x1b\x07\x9b"), repr(result.out)
    shown = json.loads(run_cli(capsys, "logs", "show", str(sid), "--json").out)  # JSON keeps the exact text
    assert shown["messages"][0]["content"].startswith("clear \x1b[2J")


def test_reading_logs_never_creates_the_database(home, capsys):
    assert run_cli(capsys, "logs").code == 0
    assert not _db(home).exists()


# ----------------------------------------------------------------------------- privacy
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_chat_data_checkpoints_and_caches_are_private(models, home, tmp_path, capsys):
    script = tmp_path / "s.txt"
    script.write_text("hello\n")
    assert run_cli(capsys, "chat", models["neo"], "--script", script, "--set", "max_new_tokens=2").code == 0
    db = _db(home)
    assert _mode(db) == 0o600 and _mode(db.parent) == 0o700
    assert all(_mode(p) == 0o600 for p in db.parent.iterdir())  # -wal and -shm too
    db.chmod(0o644)  # written by an older version
    assert run_cli(capsys, "logs").code == 0 and _mode(db) == 0o644  # reading changes nothing
    assert run_cli(capsys, "chat", models["neo"], "--script", script, "--set", "max_new_tokens=2").code == 0
    assert _mode(db) == 0o600
    from gsa_data.paths import cache_dir
    from gsa_train.loop import train

    assert _mode(cache_dir()) == 0o700
    out = tmp_path / "run"
    train({**MICRO, "corpus": str(models["corpus"]), "out": out, "steps": 4, "checkpoint_every": 2, "stop_after": 2})
    assert _mode(out / "checkpoint") == 0o700 and _mode(out / "checkpoint" / "state.pt") == 0o600


# ----------------------------------------------------------------------------- the handler
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope.toml"
    plain = run_cli(capsys, "config", "validate", missing)
    assert plain.one_clear_line and "Traceback" not in plain.err
    flagged = run_cli(capsys, "config", "validate", missing, "--debug")
    assert flagged.code == 2 and "Traceback" in flagged.err and "config file not found" in flagged.err
    monkeypatch.setenv("GSA_DEBUG", "1")
    assert "Traceback" in run_cli(capsys, "config", "validate", missing).err


def test_an_unexpected_exception_is_reported_as_a_bug(tmp_path, capsys, monkeypatch):
    import gsa_cli.commands_config as commands

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(commands, "run_schema", broken)
    result = run_cli(capsys, "config", "schema")
    assert result.code == 1 and "Traceback" not in result.err
    assert "a bug in gsa" in result.err and "--debug" in result.err and "KeyError" in result.err


def test_the_damaged_cached_default_model_is_rebuilt(models, home):
    from gsa_train import reference

    fast = {**MICRO, "corpus": str(models["corpus"]), "steps": 2}
    del fast["progress"]
    path = reference.default_chat_model(progress=False, **fast)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert not reference.is_cached(path) and "model.safetensors" in reference.cache_problem(path)
    again = reference.default_chat_model(progress=False, **fast)
    assert again == path and reference.is_cached(path)
    from gsa_plugins.adapters import load_converted

    load_converted(path)


# ----------------------------------------------------------------------------- chat input
def test_end_of_input_inside_a_block_sends_the_block(models, home, tmp_path, capsys):
    for lines, sent in ((['"""', "first line", "second line"], "first line\nsecond line"),
                        (["continued \\", "and ended"], "continued \nand ended")):
        script = tmp_path / "s.txt"
        script.write_text("\n".join(lines) + "\n")
        assert run_cli(capsys, "chat", models["neo"], "--script", script, "--set", "max_new_tokens=2").code == 0
        from gsa_chat.store import Store

        with Store(_db(home)) as store:
            latest = store.latest_session()
            assert [(m.role, m.content) for m in latest.messages][:1] == [("user", sent)]
            assert [m.role for m in latest.messages] == ["user", "assistant"]


def test_a_bad_setting_in_the_chat_is_a_message_and_the_chat_goes_on(models, home, tmp_path, capsys):
    script = tmp_path / "s.txt"
    script.write_text("/set stop \\x\nhello\n")
    result = run_cli(capsys, "chat", models["neo"], "--script", script, "--set", "max_new_tokens=2")
    assert result.code == 0 and "bad escape in the stop string" in result.out, result
    from gsa_chat.store import Store

    with Store(_db(home)) as store:
        assert [m.role for m in store.latest_session().messages] == ["user", "assistant"]
