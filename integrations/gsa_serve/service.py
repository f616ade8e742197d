"""What the HTTP handlers share: the served model's identity, the engine, the template, the key, the log.

Why one object on ``app.state``: every handler reads the same configuration, and a test or the
benchmark can build an application around an engine of its own (:func:`gsa_serve.app.create_app`).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from gsa_chat.sampling import SamplingSettings
from gsa_chat.templates import Template

from gsa_serve.engine import Engine, GenerationRequest
from gsa_serve.errors import APIError
from gsa_serve.schemas import ChatCompletionRequest, CompletionRequest


@dataclass
class Server:
    engine: Engine
    tokenizer: Any
    template: Template
    model_id: str
    api_key: str | None = None
    log_stream: TextIO | None = None  # --log-json: one JSON line per request
    sessions: Any = None  # a gsa_serve.sessions.SessionRecorder with --store
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def vocab_size(self) -> int:
        return int(self.engine.runner.model.config.vocab_size)

    def authorised(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the key (always, without a key)."""
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")

    def generation(self, body: ChatCompletionRequest | CompletionRequest, ids: list[int], request_id: str,
                   stop: list[str], prompt_param: str) -> GenerationRequest:
        """The engine request for ``body`` (limits checked, naming ``prompt_param`` for the prompt)."""
        limits, positions = self.engine.limits, self.engine.runner.max_positions
        max_new = body.max_new_tokens or limits.default_max_tokens(len(ids), positions)
        limits.check(len(ids), max_new, positions, prompt_param=prompt_param)
        settings = SamplingSettings(
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's defaults
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            max_new_tokens=max_new, seed=body.seed, stop=stop)
        return GenerationRequest(ids, settings, ignore_eos=body.ignore_eos, request_id=request_id)


__all__ = ["Server"]
