"""The endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``, ``/metrics``.

Each handler validates (the pydantic models of :mod:`gsa_serve.schemas`), builds the prompt ids off the
event loop, submits to the engine and either streams Server-Sent Events or returns the whole reply.
With an API key every endpoint but ``/health`` (what an orchestrator's liveness probe calls) needs
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gsa_serve import schemas as s
from gsa_serve.errors import APIError
from gsa_serve.prompts import chat_prompt_ids, completion_prompt_ids
from gsa_serve.service import Server
from gsa_serve.streams import DONE, Generation, collect, event_stream, sse


def server(request: Request) -> Server:
    return request.app.state.server  # type: ignore[no-any-return]


async def require_key(request: Request) -> None:
    if not server(request).authorised(request.headers.get("authorization")):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key the "
                       "server was started with (--api-key or GSA_API_KEY)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


def note(request: Request, **info: Any) -> None:
    """Facts about this request for its --log-json line (see gsa_serve.middleware)."""
    request.scope.setdefault("gsa_log", {}).update(info)


def usage(generation: Generation) -> s.UsageInfo:
    assert generation.final is not None and generation.final.usage is not None
    u = generation.final.usage
    return s.UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                       total_tokens=u.prompt_tokens + u.completion_tokens,
                       prompt_tokens_details=s.PromptTokensDetails(cached_tokens=u.cached_tokens))


def finished(request: Request, generation: Generation) -> None:
    final = generation.final
    u = final.usage if final is not None else None
    note(request, finish_reason=final.finish_reason if final is not None else "cancelled", ttft_s=generation.ttft_s,
         completion_tokens=None if u is None else u.completion_tokens,
         cached_tokens=None if u is None else u.cached_tokens)


# ----------------------------------------------------------------------------- health, metrics, models
@router.get("/health")
async def health(request: Request) -> JSONResponse:
    srv = server(request)
    ok = srv.engine.alive
    return JSONResponse({"status": "ok" if ok else "engine stopped", "model": srv.model_id, **srv.engine.counts()},
                        status_code=200 if ok else 503)


@router.get("/metrics", dependencies=[Depends(require_key)])
async def metrics(request: Request) -> Response:
    body, content_type = server(request).engine.metrics.render()
    return Response(body, media_type=content_type)


@v1.get("/models")
async def list_models(request: Request) -> s.ModelList:
    srv = server(request)
    return s.ModelList(data=[s.ModelCard(id=srv.model_id, created=srv.created)])


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> s.ModelCard:
    srv = server(request)
    srv.check_model(model_id)
    return s.ModelCard(id=srv.model_id, created=srv.created)


# ----------------------------------------------------------------------------- completions, chat and text
@dataclass(frozen=True)
class Flavour:
    """How one endpoint writes its answer: the whole response, and the chunks of a stream."""

    prefix: str  # of the response id
    response: type[s.ChatCompletion] | type[s.Completion]
    chunk: type[s.ChatCompletionChunk] | type[s.Completion]
    whole: Callable[[str, str], Any]  # (text, finish reason) -> the choice of the whole response
    piece: Callable[[str], Any]  # text -> the choice of a streamed chunk
    end: Callable[[str], Any]  # finish reason -> the choice of the last chunk
    opening: Callable[[], Any] | None = None  # the choice of a first chunk, before any text


CHAT = Flavour("chatcmpl", s.ChatCompletion, s.ChatCompletionChunk,
               whole=lambda text, reason: s.ChatChoice(message=s.AssistantMessage(content=text), finish_reason=reason),
               piece=lambda text: s.ChatChunkChoice(delta=s.ChatDelta(content=text)),
               end=lambda reason: s.ChatChunkChoice(delta=s.ChatDelta(), finish_reason=reason),
               opening=lambda: s.ChatChunkChoice(delta=s.ChatDelta(role="assistant", content="")))
TEXT = Flavour("cmpl", s.Completion, s.Completion,
               whole=lambda text, reason: s.CompletionChoice(text=text, finish_reason=reason),
               piece=lambda text: s.CompletionChoice(text=text),
               end=lambda reason: s.CompletionChoice(text="", finish_reason=reason))


@v1.post("/chat/completions", response_model=None)
async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Any:
    srv = server(request)
    srv.check_model(body.model)
    ids = await run_in_threadpool(chat_prompt_ids, srv.template, body.messages, srv.tokenizer)
    sessions = srv.sessions
    on_reply = None if sessions is None else (lambda text: sessions.record(body.messages, text))
    return await answer(request, srv, body, ids, [*body.stops, *srv.template.stop], "messages", CHAT, on_reply)


@v1.post("/completions", response_model=None)
async def completions(body: s.CompletionRequest, request: Request) -> Any:
    srv = server(request)
    srv.check_model(body.model)
    prompt: Any = body.prompt
    ids = await run_in_threadpool(completion_prompt_ids, prompt, srv.tokenizer, srv.vocab_size)
    return await answer(request, srv, body, ids, body.stops, "prompt", TEXT)


async def answer(request: Request, srv: Server, body: s.ChatCompletionRequest | s.CompletionRequest, ids: list[int],
                 stop: list[str], prompt_param: str, flavour: Flavour,
                 on_reply: Callable[[str], None] | None = None) -> Any:
    """Submit the generation; stream its chunks, or wait for the whole reply (``on_reply`` gets the text)."""
    rid = f"{flavour.prefix}-{uuid.uuid4().hex}"
    generation = Generation(srv.engine, srv.generation(body, ids, rid, stop, prompt_param))
    note(request, request_id=rid, model=body.model, stream=bool(body.stream), prompt_tokens=len(ids))
    if body.stream:
        return event_stream(_chunks(request, srv, body, generation, rid, flavour, on_reply))
    try:
        text, final = await collect(request, generation)
    finally:
        finished(request, generation)
    if on_reply is not None:
        on_reply(text)
    return flavour.response(id=rid, created=srv.created, model=srv.model_id, usage=usage(generation),
                            choices=[flavour.whole(text, str(final.finish_reason))])


async def _chunks(request: Request, srv: Server, body: s.SamplingRequest, generation: Generation, rid: str,
                  flavour: Flavour, on_reply: Callable[[str], None] | None) -> AsyncIterator[str]:
    def chunk(choices: list[Any], with_usage: bool = False) -> str:
        return sse(flavour.chunk(id=rid, created=srv.created, model=srv.model_id, choices=choices,
                                 usage=usage(generation) if with_usage else None))

    parts: list[str] = []
    try:
        if flavour.opening is not None:
            yield chunk([flavour.opening()])
        async for event in generation.events():
            if event.text:
                parts.append(event.text)
                yield chunk([flavour.piece(event.text)])
        error = generation.failure()
        if error is not None:
            yield sse(error.body())
        else:
            assert generation.final is not None
            yield chunk([flavour.end(str(generation.final.finish_reason))])
            if body.include_usage:
                yield chunk([], with_usage=True)
            if on_reply is not None:
                on_reply("".join(parts))
        yield DONE
    finally:
        finished(request, generation)


__all__ = ["require_key", "router", "v1"]
