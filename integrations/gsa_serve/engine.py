"""The engine: one thread that runs the model, batching every active session's next token into one forward.

Why one thread and continuous batching: torch work never runs on the event loop, and a forward for
``B`` sessions costs little more than one for a single session on a small model, so the loop takes,
at each step, one token for *every* active session through :meth:`Batch.step` over their stacked
pasts. Between steps, sessions leave (finished, stopped by a stop string, or cancelled by a
disconnect: their slot is free for the next step) and new ones join after their prefill. A prefill
runs as its own forward of at most ``prefill_chunk`` tokens between two decode steps, so a long prompt
never stalls the streams already running for more than one chunk.

A request first looks up the :class:`~gsa_serve.prefix_cache.PrefixCache` and prefills only the
tokens after the longest cached prefix; the state after its prompt, and after its whole reply, go
back into the cache. The HTTP side talks to the engine through :meth:`Engine.submit` (a bounded
queue: :class:`~gsa_serve.limits.QueueFullError` when full) and the ``emit`` callback each request
gives, called from the engine thread with each :class:`Event`.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from gsa_chat.sampling import SamplingSettings
from torch import Tensor

from gsa_serve.batch import Batch, prefill
from gsa_serve.limits import EngineStoppedError, Limits, QueueFullError
from gsa_serve.metrics import Metrics
from gsa_serve.prefix_cache import PrefixCache
from gsa_serve.runners import Runner, SessionPast
from gsa_serve.sampler import RowSampler
from gsa_serve.text import ReplyText

log = logging.getLogger("gsa_serve")

#: ``stop`` (eos or a stop string), ``length`` (max_tokens), ``cancelled`` (client gone, shutdown), ``error``
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the prompt's token ids and how to sample (``settings.max_new_tokens`` included)."""

    prompt_ids: list[int]
    settings: SamplingSettings
    ignore_eos: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens continued from the prefix cache, not prefilled


@dataclass(frozen=True)
class Event:
    """New reply text; the last event of a request also has ``finish_reason`` and ``usage`` (or ``error``)."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Job:
    """A request inside the engine. :meth:`cancel` may be called from any thread."""

    request: GenerationRequest
    emit: Callable[[Event], None]
    sampler: RowSampler
    text: ReplyText
    submitted: float
    engine: Engine
    generated: list[int] = field(default_factory=list)
    pending: list[int] | None = None  # prompt ids still to prefill (None: prefix cache not looked up yet)
    past: SessionPast | None = None  # during prefill
    logits: Tensor | None = None  # after the last prefilled token
    cached_tokens: int = 0
    last_token_at: float = 0.0
    done: bool = False
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the client went away): the slot is freed before the next decode step."""
        self._cancelled.set()
        self.engine.wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def usage(self) -> Usage:
        return Usage(len(self.request.prompt_ids), len(self.generated), self.cached_tokens)

    def fed_ids(self) -> list[int]:
        """The tokens the model has seen for this job: the prompt and every generated token but the last."""
        return [*self.request.prompt_ids, *self.generated[:-1]]


class Engine:
    """Runs ``runner``'s model for every submitted request; start it with :meth:`start`, end with :meth:`stop`."""

    def __init__(self, runner: Runner, tokenizer: Any, *, limits: Limits | None = None,
                 prefix_cache: PrefixCache | None = None, metrics: Metrics | None = None,
                 eos_token_id: int | None = None) -> None:
        self.runner, self.tokenizer = runner, tokenizer
        self.limits = limits or Limits()
        self.prefix_cache = prefix_cache
        self.metrics = metrics or Metrics()
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = eos if eos is not None else getattr(runner.model.config, "eos_token_id", None)
        self.batch = Batch(runner)
        self._rows: list[Job] = []  # aligned with self.batch's rows
        self._prefilling: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._in_system = 0  # waiting + prefilling + decoding, under the lock
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # what ended the engine thread, if anything did
        self._evictions_seen = 0

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="gsa-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Job:
        """Queue ``request``; ``emit`` gets its events from the engine thread. Raises :class:`LimitError`,
        :class:`QueueFullError` or :class:`EngineStoppedError`; nothing is queued then."""
        self.limits.check(len(request.prompt_ids), request.settings.max_new_tokens, self.runner.max_positions)
        stop = list(request.settings.stop)
        job = Job(request, emit, RowSampler(request.settings, self.tokenizer, self.runner.device),
                  ReplyText(self.tokenizer, stop), time.perf_counter(), self)
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            capacity = self.limits.max_sessions + self.limits.max_queue
            if self._in_system >= capacity:
                raise QueueFullError(f"all {self.limits.max_sessions} session slots are busy and "
                                     f"{self.limits.max_queue} requests are waiting; retry later")
            self._in_system += 1
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return job

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; requests still running end with ``finish_reason = "cancelled"``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def counts(self) -> dict[str, int]:
        """Waiting requests, occupied slots (prefilling + decoding) and the last batch size."""
        with self._cond:
            waiting = len(self._waiting)
            return {"queue_depth": waiting, "active_sessions": self._in_system - waiting, "batch_size": len(self.batch)}

    # ------------------------------------------------------------------ the engine thread
    def step(self) -> bool:
        """One turn of the loop: drop cancelled requests, admit waiting ones, one prefill chunk, one decode step.

        The engine thread calls it over and over; a test may call it directly (without :meth:`start`) to
        choose exactly when requests join. Returns whether there was anything to do."""
        self._drop_cancelled()
        with self._cond:
            self._admit()
        busy = bool(self._prefilling or self._rows)
        if self._prefilling:
            self._prefill_step(self._prefilling[0])
        if self._rows:
            self._decode_step()
        self._update_gauges()
        return busy

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._prefilling or self._rows):
                        self._cond.wait()
                    if self._stopping:
                        break
                self.step()
        except BaseException as exc:  # a bug: the requests get an error, /health reports it
            self.failure = exc
            log.error("the engine thread failed:\n%s", "".join(traceback.format_exception(exc)))
        finally:
            with self._cond:
                self._stopping = True
                jobs = [*self._waiting, *self._prefilling, *self._rows]
                self._waiting.clear()
            for job in jobs:
                self._finish(job, "cancelled" if self.failure is None else "error",
                             error=None if self.failure is None else "the engine stopped after an internal error")
            self._prefilling, self._rows = [], []
            self.batch = Batch(self.runner)
            self._update_gauges()

    def _admit(self) -> None:
        """Under the lock: waiting requests take free slots, in order; cancelled ones leave the queue."""
        while self._waiting and len(self._prefilling) + len(self._rows) < self.limits.max_sessions:
            job = self._waiting.popleft()
            if job.cancelled:
                self._finish(job, "cancelled", locked=True)
                continue
            self._prefilling.append(job)
            self.metrics.prompt_tokens.inc(len(job.request.prompt_ids))
        self.metrics.queue_depth.set(len(self._waiting))

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._prefilling if j.cancelled]:
            self._prefilling.remove(job)
            self._finish(job, "cancelled")
        gone = [r for r, job in enumerate(self._rows) if job.cancelled]
        if gone:
            for r in gone:
                self._finish(self._rows[r], "cancelled")
            self._keep_rows([r for r in range(len(self._rows)) if r not in set(gone)])
        with self._cond:
            gone_waiting = [j for j in self._waiting if j.cancelled]
            for job in gone_waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled", locked=True)

    def _keep_rows(self, rows: list[int]) -> None:
        self.batch.keep(rows)
        self._rows = [self._rows[r] for r in rows]

    def _prefill_step(self, job: Job) -> None:
        """One chunk of ``job``'s prompt; after the last, its first token, then it joins the batch."""
        prompt = job.request.prompt_ids
        try:
            if job.pending is None:
                self._look_up_prefix(job)
            assert job.pending is not None
            if job.pending:
                chunk, job.pending = job.pending[:self.limits.prefill_chunk], job.pending[self.limits.prefill_chunk:]
                job.logits, job.past = prefill(self.runner, job.past, chunk)
                self.metrics.prefilled_tokens.inc(len(chunk))
            if job.pending:
                return
            self._prefilling.remove(job)
            assert job.past is not None and job.logits is not None
            if self.prefix_cache is not None and job.cached_tokens < len(prompt):
                self.prefix_cache.put(prompt, job.past, job.logits)
            token = job.sampler(job.logits, self._history(job))
        except Exception as exc:  # a failed forward ends this request only
            if job in self._prefilling:
                self._prefilling.remove(job)
            self._fail([job], exc)
            return
        if self._accept(job, token):
            return
        past, job.past, job.logits = job.past, None, None
        self.batch.add(past)
        self._rows.append(job)

    def _look_up_prefix(self, job: Job) -> None:
        prompt = job.request.prompt_ids
        entry = self.prefix_cache.lookup(prompt) if self.prefix_cache is not None else None
        if entry is None:
            job.pending = list(prompt)
            if self.prefix_cache is not None:
                self.metrics.prefix_misses.inc()
            return
        job.cached_tokens = len(entry.ids)
        job.past, job.pending = entry.past, list(prompt[len(entry.ids):])
        job.logits = entry.logits if not job.pending else None
        self.metrics.prefix_hits.inc()
        self.metrics.prefix_hit_tokens.inc(job.cached_tokens)

    def _decode_step(self) -> None:
        """One token for every active session, in one forward."""
        start = time.perf_counter()
        try:
            logits = self.batch.step([job.generated[-1] for job in self._rows])
            tokens = [job.sampler(logits[r], self._history(job)) for r, job in enumerate(self._rows)]
        except Exception as exc:
            jobs, self._rows, self.batch = self._rows, [], Batch(self.runner)
            self._fail(jobs, exc)
            return
        elapsed = time.perf_counter() - start
        self.metrics.step.observe(elapsed)
        self.metrics.batch_size.set(len(self._rows))
        self.metrics.batch_sizes.observe(len(self._rows))
        self.metrics.tokens_per_second.set(len(self._rows) / elapsed if elapsed > 0 else 0.0)
        finished = [r for r, (job, token) in enumerate(zip(self._rows, tokens, strict=True))
                    if self._accept(job, token)]
        if not finished:
            return
        if self.prefix_cache is not None:
            for r in finished:
                job = self._rows[r]
                self.prefix_cache.put(job.fed_ids(), self.batch.session(r), logits[r].clone())
        self._keep_rows([r for r in range(len(self._rows)) if r not in set(finished)])

    def _history(self, job: Job) -> Tensor | None:
        if not job.sampler.needs_history:
            return None
        return torch.tensor([*job.request.prompt_ids, *job.generated], dtype=torch.long)

    def _accept(self, job: Job, token: int) -> bool:
        """Record ``job``'s new token and emit its text; returns whether the job is finished."""
        now = time.perf_counter()
        if job.generated:
            self.metrics.itl.observe(now - job.last_token_at)
        else:
            self.metrics.ttft.observe(now - job.submitted)
        job.last_token_at = now
        job.generated.append(int(token))
        self.metrics.generated_tokens.inc()
        request = job.request
        if token == self.eos_token_id and not request.ignore_eos:
            self._finish(job, "stop", text=job.text.finish())
            return True
        text = job.text.push(token)
        if job.text.stopped:
            self._finish(job, "stop", text=text)
            return True
        if len(job.generated) >= request.settings.max_new_tokens:
            self._finish(job, "length", text=text + job.text.finish())
            return True
        if text:
            self._send(job, Event(text=text))
        return False

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        log.error("generation failed for %d request(s):\n%s", len(jobs), "".join(traceback.format_exception(exc)))
        for job in jobs:
            self._finish(job, "error", error=f"generation failed: {type(exc).__name__}: {exc}")

    def _finish(self, job: Job, reason: str, *, text: str = "", error: str | None = None, locked: bool = False) -> None:
        if job.done:
            return
        job.done = True
        self.metrics.generations.labels(finish_reason=reason).inc()
        if locked:
            self._in_system -= 1
        else:
            with self._cond:
                self._in_system -= 1
        self._send(job, Event(text=text, finish_reason=reason, usage=job.usage(), error=error))

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # a consumer that is gone (its event loop closed) must not stop the engine
            log.debug("dropped an event for request %s", job.request.request_id, exc_info=True)

    def _update_gauges(self) -> None:
        m = self.metrics
        with self._cond:
            m.queue_depth.set(len(self._waiting))
            m.active_sessions.set(self._in_system - len(self._waiting))
        m.state_bytes.set(self.batch.nbytes() + sum(j.past.nbytes() for j in self._prefilling if j.past is not None))
        if not self._rows:
            m.batch_size.set(0)
        cache = self.prefix_cache
        if cache is not None:
            m.prefix_bytes.set(cache.nbytes)
            m.prefix_entries.set(len(cache))
            evicted = cache.evictions - self._evictions_seen
            if evicted:
                m.prefix_evictions.inc(evicted)
            self._evictions_seen = cache.evictions


__all__ = ["FINISH_REASONS", "Engine", "Event", "GenerationRequest", "Job", "Usage"]
