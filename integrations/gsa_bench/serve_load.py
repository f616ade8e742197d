"""The load generator of ``gsa bench serve``: concurrent streaming clients against a running ``gsa serve``.

Why measured at the client, the way ``vllm bench serve`` does: time to first token (TTFT) is what a
user waits, from sending the request to the first streamed text; inter-token latency (ITL) is the gap
between two streamed chunks; aggregate tokens/s is every completed token (the server's ``usage``)
over the wall time of the whole run. One asyncio loop drives every client over keep-alive HTTP
connections, so the generator itself costs little next to the server it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    """One streamed request as the client saw it."""

    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None


async def stream(client: Any, url: str, body: dict[str, Any], on_first: Callable[[], None] | None = None) -> Result:
    """POST ``body`` (``stream`` and usage are switched on) and time its chunks; ``on_first`` is called once the
    first text has arrived (the request is then decoding on the server)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result, arrivals, parts = Result(), [], []
    start = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = str(chunk["error"].get("message"))
                continue
            usage = chunk.get("usage")
            if usage:
                result.completion_tokens, result.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            for choice in chunk.get("choices") or ():
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if text:
                    arrivals.append(time.perf_counter())
                    parts.append(text)
                    if on_first is not None and len(arrivals) == 1:
                        on_first()
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
    if arrivals:
        result.ttft_s = arrivals[0] - start
        result.itl_s = [b - a for a, b in itertools.pairwise(arrivals)]
    result.text = "".join(parts)
    return result


def _client(connections: int) -> Any:
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=60.0),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


def concurrent_completions(base_url: str, model: str, *, clients: int, requests_per_client: int, prompt_tokens: int,
                           max_tokens: int, vocab: int, seed: int) -> dict[str, Any]:
    """``clients`` clients, each sending ``requests_per_client`` streamed completions one after another (random
    token-id prompts, so no two requests share a cached prefix; ``ignore_eos``: every reply is ``max_tokens``)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_tokens)] for _ in range(clients * requests_per_client)]

    async def run() -> tuple[list[Result], float]:
        async with _client(clients + 2) as client:
            url = base_url + "/v1/completions"

            async def one_client(i: int) -> list[Result]:
                return [await stream(client, url, {"model": model, "prompt": prompts[i * requests_per_client + r],
                                                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                        for r in range(requests_per_client)]

            start = time.perf_counter()
            per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
            return [r for rs in per_client for r in rs], time.perf_counter() - start

    results, wall = asyncio.run(run())
    return summarise(results, wall)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(results: list[Result], wall_s: float) -> dict[str, Any]:
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    itl = [gap for r in results for gap in r.itl_s]
    tokens = sum(r.completion_tokens for r in results)
    errors = [r.error for r in results if r.error]
    return {
        "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
        "wall_s": wall_s, "completion_tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99),
        "itl_mean_s": statistics.fmean(itl) if itl else None,
    }


def one_stream(base_url: str, body: dict[str, Any], path: str = "/v1/completions",
               on_first: Callable[[], None] | None = None) -> Result:
    """One streamed request (see :func:`stream`)."""

    async def run() -> Result:
        async with _client(2) as client:
            return await stream(client, base_url + path, body, on_first)

    return asyncio.run(run())


def conversation(base_url: str, model: str, user_turns: list[str],
                 reply_tokens: int) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """A chat of ``len(user_turns)`` turns, each message sent with every earlier one (as a chat UI does): per turn
    the TTFT, the prompt's tokens and how many of them came from the server's prefix cache; and the messages
    of the last request."""

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        messages: list[dict[str, str]] = []
        records: list[dict[str, Any]] = []
        sent: list[dict[str, str]] = []
        async with _client(2) as client:
            for text in user_turns:
                messages.append({"role": "user", "content": text})
                sent = list(messages)
                result = await stream(client, base_url + "/v1/chat/completions", {
                    "model": model, "messages": messages, "max_tokens": reply_tokens, "temperature": 0,
                    "ignore_eos": True})
                if result.error:  # recorded: the turns so far are still a result
                    records.append({"error": result.error})
                    break
                messages.append({"role": "assistant", "content": result.text})
                records.append({"ttft_s": result.ttft_s, "prompt_tokens": result.prompt_tokens,
                                "cached_tokens": result.cached_tokens})
        return records, sent

    return asyncio.run(run())


def proc_status_bytes(pid: int, key: str) -> int | None:
    """A ``kB`` field of another process's ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields[key].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def reset_peak(pid: int) -> bool:
    """Reset another process's resident-set high-water mark (``/proc/PID/clear_refs``); False where unsupported."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


__all__ = ["Result", "concurrent_completions", "conversation", "one_stream", "percentile", "proc_status_bytes",
           "reset_peak", "stream", "summarise"]
