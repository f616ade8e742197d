"""Loading never runs code: checkpoints load with ``weights_only=True``, model folders without ``auto_map``,
and the chat on a GSA checkpoint never prompts (docs/safety.md)."""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import _safety
import pytest
import torch
from _safety import gsa_checkpoint, run_cli, run_subprocess, tiny_bert, tiny_neo
from _train_corpus import write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TRAIN = _safety.TRAIN
DISTILL = _safety.DISTILL


class Planted:
    """Unpickling this calls ``os.system`` (what a crafted checkpoint does); it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    neo = tiny_neo(base / "neo")
    corpus = write_corpus(base / "corpus")
    return {"neo": neo, "gsa": gsa_checkpoint(neo, base / "gsa"), "bert": tiny_bert(base / "bert"), "corpus": corpus}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GSA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_train_resume_refuses_a_planted_pickle(models, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    (out / "checkpoint").mkdir(parents=True)
    torch.save({"step": 1, "settings": Planted(marker)}, out / "checkpoint" / "state.pt")
    result = run_cli(capsys, "train", "--out", out, "--corpus", models["corpus"], "--steps", "4", "--resume", *TRAIN)
    assert result.one_clear_line, result
    assert "refused to load" in result.err and "system" in result.err and "state.pt" in result.err
    assert not marker.exists()


def test_distill_resume_refuses_a_planted_pickle(models, tmp_path, capsys):
    dst, marker = tmp_path / "out", tmp_path / "PWNED"
    (dst / "checkpoints").mkdir(parents=True)
    torch.save({"stage": 1, "model": Planted(marker)}, dst / "checkpoints" / "last.pt")
    result = run_cli(capsys, "distill", models["bert"], dst, "--corpus", models["corpus"], "--stage1-steps", "2",
                     "--resume", *DISTILL)
    assert result.one_clear_line, result
    assert "refused to load" in result.err and "last.pt" in result.err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "foreign"])
def test_distill_resume_with_a_damaged_checkpoint_is_one_message(models, tmp_path, capsys, damage):
    dst = tmp_path / "out"
    common = ["--corpus", models["corpus"], *DISTILL]
    assert run_cli(capsys, "distill", models["bert"], dst, "--stage1-steps", "2", "--checkpoint-every", "1",
                   *common).code == 0
    last = dst / "checkpoints" / "last.pt"
    data = last.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "random": random.Random(damage).randbytes(4096),
               "empty": b"", "foreign": b""}
    last.write_bytes(damaged[damage])
    if damage == "foreign":
        torch.save({"weights": torch.ones(3)}, last)  # a valid file of another program
    result = run_cli(capsys, "distill", models["bert"], dst, "--stage1-steps", "4", "--resume", *common)
    assert result.one_clear_line, result
    assert "last.pt" in result.err and "without --resume" in result.err


def test_distill_resume_with_other_splats_names_the_difference(models, tmp_path, capsys):
    dst = tmp_path / "out"
    common = ["--corpus", models["corpus"], "--max-length", "32", "--batch-size", "4", "--calib-tokens", "200",
              "--no-progress"]
    assert run_cli(capsys, "distill", models["bert"], dst, "--stage1-steps", "2", "--splats", "4", *common).code == 0
    result = run_cli(capsys, "distill", models["bert"], dst, "--stage1-steps", "4", "--splats", "8", "--resume",
                     *common)
    assert result.one_clear_line, result
    assert "settings differ" in result.err and "n_splats" in result.err


def test_saved_checkpoints_carry_no_code_and_no_auto_map(models):
    config = json.loads((models["gsa"] / "config.json").read_text())
    assert "auto_map" not in config and not (models["gsa"] / "gsa_checkpoint.py").exists()


def _old_style_checkpoint(models, tmp_path: Path) -> tuple[Path, Path]:
    """A GSA checkpoint as older versions wrote it: ``auto_map`` to a ``gsa_checkpoint.py`` stub (here one that
    leaves a marker when run)."""
    folder, marker = tmp_path / "old", tmp_path / "STUB_RAN"
    shutil.copytree(models["gsa"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "gsa_checkpoint.GSAGPTNeoConfig",
                          "AutoModelForCausalLM": "gsa_checkpoint.GSAGPTNeoForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "gsa_checkpoint.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder, marker


def test_piped_chat_on_a_gsa_checkpoint_stores_both_turns_and_never_prompts(models, tmp_path, home):
    """``printf 'Return a new list\\n/exit\\n' | gsa chat MODEL``, with one more line between them, of bytes that
    are not UTF-8: they are kept with U+FFFD in their place (they used to end the session with a
    UnicodeDecodeError). One process for both: each costs seconds of imports."""
    extra = b"caf\xe9 \xff\xfe au lait\n"
    folder, marker = _old_style_checkpoint(models, tmp_path)
    proc = run_subprocess("chat", folder, "--set", "max_new_tokens=3",
                          stdin=b"Return a new list\n" + extra + b"/exit\n", env={"GSA_HOME": str(home)})
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in text, text[-2000:]
    assert "custom code" not in text and "[y/N]" not in text and not marker.exists()
    from gsa_chat.store import Store

    with Store(home / "data" / "chat.sqlite3") as store:
        (session,) = store.sessions()
        messages = [(m.role, m.content) for m in store.messages(session.id)]
    assert [role for role, _ in messages] == ["user", "assistant"] * 2
    assert messages[0][1] == "Return a new list" and messages[2][1] == "caf\ufffd \ufffd\ufffd au lait"


def test_convert_with_a_gsa_checkpoint_as_source_is_one_message(models, tmp_path, capsys):
    folder, marker = _old_style_checkpoint(models, tmp_path)
    result = run_cli(capsys, "convert", folder, tmp_path / "dst")
    assert result.one_clear_line and "already a GSA checkpoint" in result.err, result
    assert not marker.exists() and not (tmp_path / "dst").exists()


def test_distill_goes_on_fitting_a_gsa_checkpoint_without_running_its_code(models, tmp_path, home):
    """In a fresh process, where no GSA class is registered yet (the case that used to prompt or fail)."""
    from gsa_plugins.adapters import load_converted

    folder, marker = _old_style_checkpoint(models, tmp_path)
    proc = run_subprocess("distill", folder, tmp_path / "dst", "--corpus", models["corpus"], "--stage1-steps", "1",
                          "--max-length", "32", "--batch-size", "4", "--calib-tokens", "200", "--no-progress",
                          stdin=b"y\n", env={"GSA_HOME": str(home)})
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert proc.returncode == 0 and "custom code" not in text, text[-2000:]
    assert not marker.exists()
    assert type(load_converted(tmp_path / "dst" / "model")).__name__ == "GSAGPTNeoForCausalLM"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=256), st.sampled_from([b"e", b"t\0", b"}e", b"(t", b"\x80\xf4e"])))
def test_any_damaged_checkpoint_file_is_one_checkpoint_error(tmp_path, data):
    """Whatever bytes a checkpoint holds, loading it is a CheckpointError naming the file, never another
    exception: the restricted unpickler raises IndexError ('pop from empty list' for ``b"e"``) or KeyError on
    some damaged files, which used to escape as tracebacks."""
    from gsa_data.files import load_checkpoint

    from gsa_core.errors import CheckpointError

    path = tmp_path / "state.pt"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError, match=r"state\.pt"):
        warnings.simplefilter("always")
        load_checkpoint(path, required=("step",))
    assert not caught, [str(w.message) for w in caught]  # the error is the only thing the user sees
