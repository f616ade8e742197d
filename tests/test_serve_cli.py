"""``gsa serve`` on the command line: bad options end as one message and exit 2 before any model loads; no MODEL
serves the embedded default as ``gsa chat`` resolves it; the Dockerfile is the one the docs describe."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from _serve_models import build_gsa_chat_model
from gsa_cli.main import main
from gsa_serve.command import is_loopback

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GSA_API_KEY", raising=False)


def run_serve(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(["serve", *argv])
    err = capsys.readouterr().err
    return status, err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--host", "0.0.0.0"], "needs an API key: pass --api-key KEY or set GSA_API_KEY"),
    (["--host", "192.168.1.20"], "needs an API key"),
    (["--port", "70000"], "--port 70000 is not a port"),
    (["--max-sessions", "0"], "--max-sessions 0"),
    (["--max-queue", "-1"], "--max-queue -1"),
    (["--max-tokens", "1000000"], "--max-tokens 1000000"),
    (["--prefix-cache-mib", "-5"], "--prefix-cache-mib -5"),
    (["--grace-period", "-1"], "--grace-period -1"),
    (["--template", "chatml"], "Available templates: auto, tinystories-instruct, plain, chat-template"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_option_is_one_message_and_exit_2(argv, expected, capsys, no_key) -> None:
    status, err = run_serve(capsys, *argv)
    assert status == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_empty_api_key_is_refused(capsys, monkeypatch) -> None:
    monkeypatch.setenv("GSA_API_KEY", " ")
    status, err = run_serve(capsys, "--host", "0.0.0.0")
    assert status == 2 and "the API key is empty" in err


def test_a_port_in_use_is_named(capsys, no_key) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        status, err = run_serve(capsys, "--port", str(taken.getsockname()[1]))
    assert status == 2 and "the port is in use" in err


def test_a_missing_model_folder_is_named(capsys, tmp_path, no_key) -> None:
    status, err = run_serve(capsys, str(tmp_path / "nope"), "--port", "0")
    assert status == 2 and "does not exist" in err


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("::", False), ("10.0.0.2", False), ("example.com", False)])
def test_only_loopback_addresses_count_as_local(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_model_serves_the_embedded_default_as_gsa_chat_resolves_it(tmp_path, monkeypatch, capsys, no_key) -> None:
    import uvicorn
    from gsa_chat import models

    folder = build_gsa_chat_model(tmp_path / "default-model")
    asked = []
    monkeypatch.setattr(models, "default_model_path", lambda progress=True: asked.append(progress) or folder)
    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.update(app=self.config.app))
    threads = torch.get_num_threads()
    try:
        status, err = run_serve(capsys, "--port", "0", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert status == 0 and asked == [True]
    server = served["app"].app.state.server
    assert server.model_id == "default-model" and server.engine.runner.kind == "recurrent"
    assert "gsa serve: default-model (recurrent (state, window)" in err and "listening on http://127.0.0.1:" in err


# ----------------------------------------------------------------------------- the Dockerfile
def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def test_the_dockerfile_installs_cpu_torch_first_runs_unprivileged_and_checks_health() -> None:
    steps = instructions((ROOT / "Dockerfile").read_text())
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM"
    runs = [(i, args) for i, (k, args) in enumerate(steps) if k == "RUN"]
    torch_step = next(i for i, args in runs if "torch==" in args)
    pin = torch.__version__.split("+")[0]
    assert f"torch=={pin}" in steps[torch_step][1] and "download.pytorch.org/whl/cpu" in steps[torch_step][1]
    project_step = next(i for i, args in runs if "pip install ." in args)
    assert torch_step < project_step  # the CPU build is there before the project's torch range is resolved
    user_step = kinds.index("USER")
    assert steps[user_step][1] not in ("root", "0") and project_step < user_step < kinds.index("ENTRYPOINT")
    health = steps[kinds.index("HEALTHCHECK")][1]
    assert "/health" in health and "127.0.0.1:8000" in health
    entry = steps[kinds.index("ENTRYPOINT")][1]
    assert '"gsa", "serve", "--host", "0.0.0.0", "--port", "8000"' in entry
    for kind, args in steps:
        if kind == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "tests"} <= set(ignored)
    assert not {"gsa_core", "gsa_plugins", "integrations", "pyproject.toml", "README.md"} & set(ignored)
