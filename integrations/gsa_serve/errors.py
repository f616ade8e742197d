"""Every failure of a request as one OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``.

Why one translation point: whatever goes wrong (a malformed body, a field out of range, an unknown
model, a full queue, a bug), the client gets a status code it can act on and a message naming the
problem, never a 500 for its own mistake and never a traceback. FastAPI's own validation and HTTP
errors are routed through the same handlers (:func:`install_handlers`).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gsa_chat.sampling import SettingsError
from gsa_chat.templates import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gsa_serve.limits import EngineStoppedError, LimitError, QueueFullError

log = logging.getLogger("gsa_serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
#: Union members and validator wrappers pydantic puts into an error's location: not request fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "nullable"})


class APIError(Exception):
    """An error answer: HTTP ``status``, a message naming the problem, and OpenAI's ``type``/``param``/``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``messages[0].role`` (union tags and the body itself left out)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if "[" in text or text in _TYPE_TAGS or text.startswith("function-"):
            break
        out += f".{text}" if out else text
    return out or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """One 400 for pydantic's errors: the first problem in words, with its parameter."""
    if not errors:
        return APIError(400, "the request body is not valid")
    first = errors[0]
    param = _param(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({reason}); send a JSON object",
                        code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if kind == "missing":
        message = f"'{param}' is required" if param else "a required field is missing"
    elif param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        message = "the request body must be a JSON object"
    else:
        same = [e for e in errors if _param(e.get("loc", ())) == param]
        texts = list(dict.fromkeys(str(e.get("msg", "")).removeprefix("Value error, ") for e in same))
        message = f"invalid value for '{param}': {' or '.join(texts)}" if param else "; ".join(texts)
        if "input" in first and kind not in ("value_error",) and not isinstance(first["input"], (dict, list)):
            message += f" (got {first['input']!r})"
    others = len({_param(e.get("loc", ())) for e in errors} - {param})
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


def from_exception(exc: BaseException) -> APIError:
    """The API error for anything a request handler raised."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return validation_error(exc.errors())
    if isinstance(exc, LimitError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, (SettingsError, TemplateError)):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, StarletteHTTPException):
        messages = {404: "no such endpoint; see GET /v1/models, POST /v1/chat/completions, POST /v1/completions",
                    405: "method not allowed for this endpoint"}
        return APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                        headers=getattr(exc, "headers", None))
    log.error("internal error while answering a request:\n%s", "".join(traceback.format_exception(exc)))
    return APIError(500, f"internal server error ({type(exc).__name__}); the server log has the details",
                    code="internal_error")


def install_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Route every exception a request can raise through :func:`from_exception`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = from_exception(exc)
        if error.status == 429:
            error.headers["Retry-After"] = str(retry_after_s)
        return error.response()

    for kind in (APIError, RequestValidationError, ValidationError, LimitError, QueueFullError, EngineStoppedError,
                 SettingsError, TemplateError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)


__all__ = ["ERROR_TYPES", "APIError", "from_exception", "install_handlers", "validation_error"]
