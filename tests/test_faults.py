"""Faults: Ctrl+C during ``gsa train``/``gsa distill`` writes a checkpoint and exits 130 with how to resume;
``kill -9`` at a random point of a run or of the chat store loses nothing that was committed (docs/safety.md).

Ctrl+C is a real SIGINT sent to this process (in-process runs through ``gsa_cli.main.main``, fast); the kills
are of real ``gsa`` processes on one thread, at moments drawn from a seeded generator (``GSA_FAULT_SEED``, in
every assertion message) so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _safety
import pytest
import torch
from _safety import tiny_bert
from _train_corpus import write_corpus

SEED = int(os.environ.get("GSA_FAULT_SEED", "0"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TRAIN = _safety.TRAIN
DISTILL = [*_safety.DISTILL, "--stage1-lr", "0.05"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fault-inputs")
    return {"corpus": write_corpus(base / "corpus"), "bert": tiny_bert(base / "bert")}


def gsa(*args: object, home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gsa_cli.main", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**ENV, "GSA_HOME": str(home)})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode("utf-8", "replace")


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# ----------------------------------------------------------------------------- Ctrl+C
def ctrl_c_after_the_first_checkpoint(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """Patch ``owner.name`` (the function that writes a checkpoint) to send this process a real SIGINT once,
    right after the first checkpoint, as a Ctrl+C in the terminal would (the loop then checks it after the step)."""
    save, pressed = getattr(owner, name), []

    def save_then_ctrl_c(*a, **kw):
        save(*a, **kw)
        if not pressed:  # once: a second Ctrl+C means "quit now"
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(owner, name, save_then_ctrl_c)


def interrupted_step(result) -> int:
    assert result.code == 130 and "Traceback" not in result.err, result
    found = re.search(r"interrupted at step (\d+) of 100000", result.err)
    assert found and "--resume" in result.err, result
    return int(found.group(1))


def test_ctrl_c_during_training_writes_a_checkpoint_and_resume_finishes(inputs, tmp_path, capsys, monkeypatch):
    import gsa_train.loop
    from _safety import run_cli

    out = tmp_path / "run"
    args = ["train", "--out", out, "--corpus", inputs["corpus"], "--checkpoint-every", "2", *TRAIN]
    ctrl_c_after_the_first_checkpoint(monkeypatch, gsa_train.loop, "_save_state")
    step = interrupted_step(run_cli(capsys, *args, "--steps", "100000"))
    assert checkpoint_step(out / "checkpoint" / "state.pt") == step
    monkeypatch.undo()
    result = run_cli(capsys, *args, "--steps", str(step + 2), "--resume")
    assert result.code == 0, result.err[-2000:]
    assert json_of(out / "train.json")["resumed_from"] == step


def test_ctrl_c_during_distillation_writes_a_checkpoint_and_resume_finishes(inputs, tmp_path, capsys, monkeypatch):
    from _safety import run_cli
    from gsa_distill.engine import Distiller

    dst = tmp_path / "out"
    args = ["distill", inputs["bert"], dst, "--corpus", inputs["corpus"], "--checkpoint-every", "1", *DISTILL]
    ctrl_c_after_the_first_checkpoint(monkeypatch, Distiller, "_save_ckpt")
    step = interrupted_step(run_cli(capsys, *args, "--stage1-steps", "100000"))
    assert checkpoint_step(dst / "checkpoints" / "last.pt") == step
    monkeypatch.undo()
    result = run_cli(capsys, *args, "--stage1-steps", str(step + 1), "--resume")
    assert result.code == 0, result.err[-2000:]
    assert json_of(dst / "distill.json")["finished"] is True and (dst / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- kill -9
def kill_and_resume(args: list[object], ckpt: Path, home: Path, rng: random.Random, kills: int) -> None:
    """Start the run, ``kill -9`` it ``kills`` times at random points after a checkpoint exists (resuming each
    time), then let the last resume finish."""
    proc = gsa(*args, home=home)
    for _ in range(kills):
        wait_for(ckpt, proc)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.returncode == 0:  # it finished first: nothing left to interrupt
            return
        checkpoint_step(ckpt)  # whatever moment it died at, the checkpoint on disk is whole
        proc = gsa(*args, "--resume", home=home)
    code, err = finish(proc)
    assert code == 0, err[-2000:]


def one_thread_reference(capsys: pytest.CaptureFixture[str], *args: object) -> None:
    """The uninterrupted run, in-process on one thread like the killed processes (so the sums round the same)."""
    from _safety import run_cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_cli(capsys, *args)
    finally:
        torch.set_num_threads(threads)
    assert result.code == 0, result.err[-2000:]


def test_kill_9_during_training_loses_nothing(inputs, tmp_path, capsys):
    rng = random.Random(SEED)
    common = ["train", "--corpus", inputs["corpus"], "--steps", "16", "--checkpoint-every", "1", *TRAIN]
    out = tmp_path / "killed"
    kill_and_resume([*common, "--out", out], out / "checkpoint" / "state.pt", tmp_path, rng, kills=1)
    one_thread_reference(capsys, *common, "--out", tmp_path / "whole")
    whole, resumed = tensors(tmp_path / "whole" / "model.safetensors"), tensors(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:  # the batches are a function of (seed, step): a resumed run is the same run
        assert torch.equal(whole[name], resumed[name]), (name, f"GSA_FAULT_SEED={SEED}")


def test_kill_9_during_distillation_loses_nothing(inputs, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    common = ["distill", inputs["bert"], "--corpus", inputs["corpus"], "--stage1-steps", "12", "--checkpoint-every",
              "1", *DISTILL]
    dst = tmp_path / "killed"
    kill_and_resume([*common[:2], dst, *common[2:]], dst / "checkpoints" / "last.pt", tmp_path, rng, kills=1)
    one_thread_reference(capsys, *common[:2], tmp_path / "whole", *common[2:])
    whole = tensors(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = tensors(dst / "model" / "model.safetensors")
    banks = [k for k in whole if ".gsa." in k or "bank" in k]
    assert banks and whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), (name, f"GSA_FAULT_SEED={SEED}")


WRITER = textwrap.dedent("""
    import sys
    from gsa_chat.store import Store
    store = Store(sys.argv[1])
    sid = store.create_session(model="m").id
    for i in range(100000):
        mid = store.add_message(sid, "user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * (i % 50))
        print(mid, i, flush=True)  # printed only once committed
""")


def test_kill_9_of_the_chat_store_loses_no_committed_message(tmp_path):
    rng = random.Random(SEED + 2)
    db = tmp_path / "chat.sqlite3"
    committed: dict[int, str] = {}
    for _ in range(2):  # two writers in turn on the same file, each killed at a random moment
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, env=ENV)
        wanted = rng.randint(5, 200)
        for _ in range(wanted):
            mid, i = map(int, proc.stdout.readline().split())
            committed[mid] = f"message {i} " + "x" * (i % 50)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        for line in proc.stdout.read().split(b"\n"):  # lines printed before the kill landed
            if line.strip():
                mid, i = map(int, line.split())
                committed[mid] = f"message {i} " + "x" * (i % 50)
    from gsa_chat.store import Store

    with Store(db) as store:
        stored = {m.id: m.content for s in store.sessions() for m in store.messages(s.id)}
    assert all(stored.get(mid) == text for mid, text in committed.items()), f"GSA_FAULT_SEED={SEED}"
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()
