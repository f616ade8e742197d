"""Shared pieces of the safety tests (docs/safety.md): the CLI run in-process, file snapshots, damaged inputs.

Nothing here imports code added for the safety work, so the fault and fuzz tests also run against an older
checkout (that is how the campaign's "before" figures were measured).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def one_clear_line(self) -> bool:
        """Exit 2 with exactly one error line on stderr (ours, or argparse's usage error) and no traceback;
        progress bars of the libraries may come before it."""
        lines = [line for line in self.err.splitlines() if line.startswith("error:") or ": error:" in line]
        return self.code == 2 and "Traceback" not in self.err and len(lines) == 1


#: ``gsa train`` on the micro layout in a few seconds (the safety, fault and loading tests' shared settings)
TRAIN = ["--layout", "micro", "--vocab-size", "300", "--batch-size", "4", "--block-len", "32", "--warmup-steps", "2",
         "--eval-blocks", "8", "--no-progress"]
#: ``gsa distill`` of a tiny BERT in a few seconds (each test adds its stage settings)
DISTILL = ["--max-length", "32", "--batch-size", "4", "--calib-tokens", "200", "--splats", "4", "--no-progress"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> Result:
    """``gsa ARGS`` in-process (fast); argparse's usage errors come back as their exit status."""
    from gsa_cli.main import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return Result(int(code), out.out, out.err)


def run_subprocess(*args: str | os.PathLike[str], stdin: bytes | None = None, env: dict[str, str] | None = None,
                   timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m gsa_cli.main ARGS`` in a fresh process (one thread, offline), bytes in and out."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gsa_cli.main", *map(str, args)], input=stdin, capture_output=True,
                          timeout=timeout, env=full_env, stdin=None if stdin is not None else subprocess.DEVNULL)


# ----------------------------------------------------------------------------- file snapshots
def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (what a command must not have changed)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files that existed before and were modified or removed."""
    return sorted(k for k, digest in before.items() if after.get(k) != digest)


# ----------------------------------------------------------------------------- models and damage
def tiny_neo(folder: Path) -> Path:
    from _chat_models import build_chat_model

    return build_chat_model(folder)


def tiny_bert(folder: Path) -> Path:
    from _distill_models import tiny_bert_folder

    return tiny_bert_folder(folder)


def gsa_checkpoint(src: Path, folder: Path) -> Path:
    """``src`` (a tiny GPT-Neo folder) converted to GSA and saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsa_plugins.adapters import convert

    model = AutoModelForCausalLM.from_pretrained(src)
    convert(model, {"bank": {"n_splats": 4}, "backend": "kernel",
                    "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return folder


def damaged_copy(src: Path, dst: Path, damage: str) -> Path:
    """A copy of the model folder ``src`` with one kind of damage."""
    shutil.copytree(src, dst)
    weights, config = dst / "model.safetensors", dst / "config.json"
    if damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif damage == "empty-weights":
        weights.write_bytes(b"")
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "corrupt-config":
        config.write_text(config.read_text()[:40])
    elif damage == "field-type":
        data = json.loads(config.read_text())
        data["hidden_size"] = "abc"
        config.write_text(json.dumps(data))
    elif damage == "no-config":
        config.unlink()
    elif damage == "config-not-object":
        config.write_text("[1, 2, 3]")
    elif damage == "binary-config":
        config.write_bytes(b"\xff\xfe\x00garbage")
    else:
        raise ValueError(damage)
    return dst


DAMAGES = ("truncated-weights", "empty-weights", "no-weights", "corrupt-config", "field-type", "no-config",
           "config-not-object", "binary-config")


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` not writable, also for root (``chattr +i``; skips the test where that is not possible)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a path read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], capture_output=True)


__all__ = ["DAMAGES", "ROOT", "Result", "changed", "damaged_copy", "gsa_checkpoint", "read_only", "run_cli",
           "run_subprocess", "snapshot", "tiny_bert", "tiny_neo"]
