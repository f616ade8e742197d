"""``gsa bench serve``: the client's reading of a stream, the summary against the targets, and (slow) a quick run.

Timings are never asserted: only what is read from a stream and how figures become ratios.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from gsa_bench import serve, serve_load


def sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def run_stream(status: int, body: bytes) -> serve_load.Result:
    async def go() -> serve_load.Result:
        transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await serve_load.stream(client, "http://server/v1/chat/completions", {"model": "m"})

    return asyncio.run(go())


def test_a_stream_is_read_as_the_client_sees_it() -> None:
    body = sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
               {"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
               {"choices": [{"delta": {}, "finish_reason": "length"}]},
               {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                                         "prompt_tokens_details": {"cached_tokens": 3}}}, "[DONE]")
    result = run_stream(200, body)
    assert result.text == "Hello" and result.finish_reason == "length" and result.error is None
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (5, 2, 3)
    assert result.ttft_s is not None and len(result.itl_s) == 1  # two text chunks: one gap


def test_a_completion_stream_and_errors_are_read_too() -> None:
    result = run_stream(200, sse({"choices": [{"text": "a"}]}, {"error": {"message": "boom"}}, "[DONE]"))
    assert result.text == "a" and result.error == "boom"
    refused = run_stream(429, b'{"error": {"message": "busy"}}')
    assert refused.error.startswith("HTTP 429") and refused.ttft_s is None


def test_percentiles_interpolate() -> None:
    assert serve_load.percentile([], 0.5) is None
    assert serve_load.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert serve_load.percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)


def report(gsa_16: float, gsa_mem: int, gsa_turn: float) -> dict:
    def model(tps16: float, mem: int, turn: float) -> dict:
        level = {"tokens_per_s": 10.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "itl_p50_s": 0.01, "itl_p99_s": 0.02,
                 "peak_rss_bytes": 1 << 30}
        return {"levels": {"1": level, "16": {**level, "tokens_per_s": tps16}},
                "memory": {"1024": {"state_bytes": mem}, "8192": {"state_bytes": mem}},
                "turns": {"turn_ttft_cached_median_s": turn, "turn_ttft_reprefill_median_s": 1.0}}

    return {"settings": {"contexts": [1024, 8192], "turns": 10, "server_threads": 1},
            "models": {"gsa": model(gsa_16, gsa_mem, gsa_turn), "softmax": model(30.0, 1000, 0.5)}}


def test_the_summary_compares_against_the_targets() -> None:
    good = report(gsa_16=45.0, gsa_mem=90, gsa_turn=0.15)
    good["summary"] = serve.summarise(good)
    assert good["summary"]["gsa_batching_speedup_16"] == pytest.approx(4.5)
    assert good["summary"]["memory_ratio"] == {"context": 8192, "gsa_over_softmax": pytest.approx(0.09)}
    assert good["summary"]["targets_met"] == {"batching_speedup_16": True, "memory_ratio": True,
                                              "turn_ttft_ratio": True}
    bad = report(gsa_16=20.0, gsa_mem=200, gsa_turn=0.5)
    bad["summary"] = serve.summarise(bad)
    assert bad["summary"]["targets_met"] == {"batching_speedup_16": False, "memory_ratio": False,
                                             "turn_ttft_ratio": False}
    table = serve.markdown(good)
    assert "| gsa | 16 | 45.0 |" in table and "| gsa | 8192 |" in table and "(>= 4x: met)" in table


@pytest.mark.slow
def test_a_quick_run_writes_every_measurement(tmp_path) -> None:
    assert serve.main(["--quick", "--clients", "1,2", "--contexts", "32,96", "--out", str(tmp_path), "--quiet"]) == 0
    data = json.loads((tmp_path / "serve.json").read_text())
    for kind in ("gsa", "softmax"):
        result = data["models"][kind]
        assert set(result["levels"]) == {"1", "2"} and all(lv["errors"] == 0 for lv in result["levels"].values())
        assert all(result["memory"][c]["state_bytes"] for c in ("32", "96"))
        assert result["turns"]["conversations"][0]["turns"][-1]["cached_tokens"] > 0
        assert result["turns"]["conversations"][0]["reprefill"]["cached_tokens"] == 0
    gsa, soft = data["models"]["gsa"]["memory"], data["models"]["softmax"]["memory"]
    assert gsa["32"]["state_bytes"] == gsa["96"]["state_bytes"] < soft["96"]["state_bytes"]
    assert soft["96"]["state_bytes"] > soft["32"]["state_bytes"]
