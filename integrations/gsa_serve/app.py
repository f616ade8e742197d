"""The FastAPI application around one :class:`~gsa_serve.service.Server`: routes, error handlers, lifespan.

The engine thread starts with the application (lifespan start-up) and stops after it (shutdown, which
uvicorn reaches once in-flight streams have drained or the grace period has passed). The returned
ASGI app is the FastAPI app inside :class:`~gsa_serve.middleware.RequestRecorder`; the FastAPI app
itself is its ``.app`` (interactive API docs at ``/docs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from gsa_serve.errors import install_handlers
from gsa_serve.middleware import RequestRecorder
from gsa_serve.routes import router, v1
from gsa_serve.service import Server


def create_app(server: Server) -> RequestRecorder:
    """The ASGI application serving ``server``'s model."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not server.engine.alive:
            server.engine.start()
        if server.sessions is not None:
            server.sessions.start()
        try:
            yield
        finally:
            server.engine.stop()
            if server.sessions is not None:
                server.sessions.stop()

    app = FastAPI(title="gsa serve", description=f"OpenAI-compatible API serving {server.model_id}",
                  lifespan=lifespan)
    app.state.server = server
    install_handlers(app)
    app.include_router(router)
    app.include_router(v1)
    return RequestRecorder(app, server.engine.metrics, server.log_stream)


def fastapi_app(asgi: Any) -> FastAPI:
    """The FastAPI app inside :func:`create_app`'s result."""
    return asgi.app  # type: ignore[no-any-return]


__all__ = ["create_app", "fastapi_app"]
