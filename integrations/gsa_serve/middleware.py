"""Around every request: the body-size bound, JSON bodies, the request counter by status, the ``--log-json`` line.

Why plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: it sees a streamed response end (or
its client disconnect) exactly when it happens, without buffering the stream or changing how
Starlette cancels a streaming task, so a cancelled stream is counted and logged at once.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from gsa_common import utc_now

from gsa_serve.errors import APIError
from gsa_serve.metrics import Metrics

#: The largest request body accepted (413 beyond): far above any prompt the limits allow.
MAX_BODY_BYTES = 8 << 20
#: Endpoints counted under their own label; anything else is counted as "other".
ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})

#: Content types a body is read as JSON under anyway: none given, or curl's and plain text defaults. The body
#: must still parse as JSON (400 otherwise), so nothing is silently read another way.
_NOT_JSON = frozenset({b"", b"application/x-www-form-urlencoded", b"text/plain"})

ASGIApp = Any


class RequestRecorder:
    """Counts each answered request by endpoint and status, and with ``log_stream`` writes one JSON line for it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_stream: TextIO | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.metrics, self.log_stream, self.max_body = app, metrics, log_stream, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 0}
        info: dict[str, Any] = scope.setdefault("gsa_log", {})

        async def send_recorded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        headers = dict(scope.get("headers", []))
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        if scope.get("method") == "POST" and headers.get(b"content-type", b"").split(b";")[0].strip() in _NOT_JSON:
            scope["headers"] = [*((k, v) for k, v in scope["headers"] if k != b"content-type"),
                                (b"content-type", b"application/json")]
        try:
            if length > self.max_body:
                await _too_large(self.max_body, send_recorded)
            else:
                await self.app(scope, _bounded(receive, self.max_body), send_recorded)
        finally:
            self._record(scope, status["code"], start, info)

    def _record(self, scope: dict[str, Any], code: int, start: float, info: dict[str, Any]) -> None:
        path = scope.get("path", "")
        route = getattr(scope.get("route"), "path", None)
        endpoint = "/v1/models" if str(route).startswith("/v1/models") else route if route in ENDPOINTS else "other"
        status = str(code) if code else "disconnected"
        self.metrics.requests.labels(endpoint=endpoint, status=status).inc()
        if self.log_stream is None:
            return
        client = scope.get("client")
        line = {"time": utc_now(), "method": scope.get("method"), "path": path, "status": code or None,
                "duration_s": round(time.perf_counter() - start, 6), "client": client[0] if client else None, **info}
        self.log_stream.write(json.dumps(line, default=str) + "\n")
        self.log_stream.flush()


def _bounded(receive: Any, limit: int) -> Any:
    """``receive`` that refuses a body (sent without a Content-Length) once it grows past ``limit`` bytes."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        return message  # type: ignore[no-any-return]

    return wrapped


async def _too_large(limit: int, send: Any) -> None:
    response = APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large").response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


__all__ = ["ENDPOINTS", "MAX_BODY_BYTES", "RequestRecorder"]
