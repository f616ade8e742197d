"""Tiny models for the server tests (built locally, nothing downloaded), and a ``gsa serve`` subprocess helper."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

#: A GPT-Neo layout converted the way the embedded default is: the global layer GSA (kernel state), the local
#: layer exact (a window of 8 keys); small enough for fast tests.
GSA_CONFIG = {"backend": "kernel", "bank": {"n_splats": 8}, "initializer": "random",
              "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}}


def build_gsa_chat_model(folder: Path, **kwargs: object) -> Path:
    """``tests/_chat_models.build_chat_model`` converted to GSA and saved as a GSA checkpoint with its tokenizer."""
    from _chat_models import build_chat_model
    from gsa_chat.models import load_chat_model

    from gsa_plugins.adapters import convert

    soft = build_chat_model(folder.with_name(folder.name + "-softmax"), **kwargs)  # type: ignore[arg-type]
    loaded = load_chat_model(soft)
    torch.manual_seed(0)
    convert(loaded.model, GSA_CONFIG)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def sensitive_gpt_neo(seed: int = 0, *, vocab: int = 61, window: int = 4, positions: int = 256):
    """A random GPT-Neo whose attention matters (weights 10x the default scale): a mixed-up past changes its
    tokens, so batching tests can fail."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=32, num_layers=2,
                          num_heads=4, attention_types=[[["global", "local"], 1]], window_size=window,
                          initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPTNeoForCausalLM(config).eval()


class ServerProcess:
    """``gsa serve ARGS`` on 127.0.0.1 with ``--port 0``; :meth:`wait` returns its base URL once it listens."""

    LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)/v1")

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._url: str | None = None
        self._ready = threading.Event()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "gsa_cli.main", "serve", *args, "--host", "127.0.0.1",
                                      "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=full_env)
        self._threads = [threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout), daemon=True),
                         threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True)]
        for t in self._threads:
            t.start()

    def _drain(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            match = self.LISTENING.search(line)
            if match:
                self._url = match.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def wait(self, timeout: float = 120.0) -> str:
        """The base URL (``http://127.0.0.1:PORT``); fails with the server's output if it did not start."""
        self._ready.wait(timeout)
        if self._url is None:
            self.stop()
            raise AssertionError(f"gsa serve did not start (exit {self.proc.poll()}):\n{''.join(self.stderr)[-4000:]}")
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:  # listening from the start; ready once the lifespan has run
            try:
                if httpx.get(self._url + "/health", timeout=5).status_code == 200:
                    return self._url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gsa serve never became healthy:\n{''.join(self.stderr)[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            return self.proc.wait(timeout)
        finally:
            for t in self._threads:
                t.join(5)
