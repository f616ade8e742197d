"""Run ``gsa serve`` in a subprocess and wait until it answers: what the tests and ``gsa bench serve`` share.

Why a helper of the package (vLLM's tests keep a ``RemoteOpenAIServer`` for the same job): a server is
only ready once it listens *and* its engine runs, and a caller needs the port it chose (``--port 0``),
its output (kept, never left to fill a pipe) and a clean stop. The helper reads the ``listening on``
line ``gsa serve`` prints, then polls ``/health``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO


class ServerProcess:
    """``gsa serve ARGS --host 127.0.0.1 --port 0`` in a subprocess; :meth:`wait` returns its base URL once healthy."""

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

    def _drain(self, stream: IO[str], lines: list[str]) -> None:
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
            raise RuntimeError(f"gsa serve did not start (exit {self.proc.poll()}):\n{''.join(self.stderr)[-4000:]}")
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # listening from the start; ready once the lifespan has run
            try:
                if httpx.get(self._url + "/health", timeout=5).status_code == 200:
                    return self._url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gsa serve never became healthy:\n{''.join(self.stderr)[-4000:]}")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def metrics(self, api_key: str | None = None) -> dict[str, float]:
        """``GET /metrics`` as ``{'name{label="value",...}': value}`` (plain ``name`` for a sample without labels)."""
        return scrape(self.wait(), api_key)

    def stop(self, timeout: float = 30.0, *, graceful: bool = False) -> int | None:
        """End the server (SIGTERM and wait with ``graceful``, else kill); returns its exit status."""
        if self.proc.poll() is None and graceful:
            self.proc.send_signal(signal.SIGTERM)
        elif self.proc.poll() is None:
            self.proc.kill()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)
        finally:
            for t in self._threads:
                t.join(5)


def scrape(url: str, api_key: str | None = None) -> dict[str, float]:
    """The samples of a server's ``/metrics`` (see :meth:`ServerProcess.metrics`)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url + "/metrics", headers=headers, timeout=60)
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return samples


__all__ = ["ServerProcess", "scrape"]
