"""A generation seen from the event loop: the engine's events as an async iterator, and Server-Sent Events.

Why a queue per request fed with ``call_soon_threadsafe``: the engine thread must never wait on the
event loop, and the loop must never wait on torch. Leaving the iterator early (the client
disconnected: Starlette cancels the streaming task; or a non-streaming client went away) cancels the
engine job, which frees its batch slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gsa_serve.engine import Engine, Event, GenerationRequest
from gsa_serve.errors import APIError

#: Headers of every event stream: no caching, and no buffering by a reverse proxy (nginx reads X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.25


class Generation:
    """A submitted request: :meth:`events` yields its engine events, the last one ``final``."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.started = time.perf_counter()
        self.first_event_at: float | None = None
        self.final: Event | None = None
        self.job = engine.submit(request, lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event))

    async def events(self) -> AsyncIterator[Event]:
        try:
            while self.final is None:
                event = await self.queue.get()
                if self.first_event_at is None:
                    self.first_event_at = time.perf_counter()
                if event.final:
                    self.final = event
                yield event
        finally:
            if self.final is None:  # the consumer left early: stop generating now
                self.job.cancel()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_event_at is None else self.first_event_at - self.started

    def failure(self) -> APIError | None:
        """The error to answer with when the generation did not complete."""
        final = self.final
        if final is None or final.finish_reason == "cancelled":
            return APIError(503, "the generation was cancelled: the server is shutting down", code="cancelled")
        if final.error is not None or final.finish_reason == "error":
            return APIError(500, final.error or "generation failed", code="generation_failed")
        return None


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    generation.job.cancel()


async def collect(request: Request, generation: Generation) -> tuple[str, Event]:
    """The whole reply of a non-streaming request (cancelled if its client disconnects meanwhile)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
    parts = []
    try:
        async for event in generation.events():
            parts.append(event.text)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    error = generation.failure()
    if error is not None:
        raise error
    assert generation.final is not None
    return "".join(parts), generation.final


def sse(data: BaseModel | dict[str, Any]) -> str:
    """One Server-Sent Event (``data: ...`` and a blank line)."""
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {text}\n\n"


DONE = "data: [DONE]\n\n"


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


__all__ = ["DONE", "SSE_HEADERS", "Generation", "collect", "event_stream", "sse"]
