"""``gsa serve`` as a real subprocess on 127.0.0.1, driven with the official ``openai`` client (and raw httpx).

Two servers for the whole module, started together: ``main`` (an API key, --log-json, --store, 16 slots) for
the API, and ``tight`` (one slot, a queue of one) for overload, disconnects and SIGTERM, in that order.
Waits are bounded polls of /metrics, never timings.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from _serve_models import build_gsa_chat_model
from gsa_serve.launch import ServerProcess, scrape

KEY = "test-key-0123"
MODEL = "tiny-gsa"
POLL_S = 20.0  # the longest a state change seen in /metrics may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("gsa-home")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, home):
    folder = build_gsa_chat_model(tmp_path_factory.mktemp("models") / "gsa")
    common = ["--model-name", MODEL, "--threads", "1"]
    started = {
        "main": ServerProcess(str(folder), *common, "--api-key", KEY, "--log-json", "--store", "--max-sessions", "16",
                              "--max-queue", "16", "--max-prompt-tokens", "512", env={"GSA_HOME": str(home)}),
        "tight": ServerProcess(str(folder), *common, "--max-sessions", "1", "--max-queue", "1",
                               "--grace-period", "60", env={"GSA_HOME": str(home)}),
    }
    yield started
    for proc in started.values():
        proc.stop()


@pytest.fixture(scope="module")
def main_url(servers) -> str:
    return servers["main"].wait()


@pytest.fixture(scope="module")
def tight_url(servers) -> str:
    return servers["tight"].wait()


@pytest.fixture(scope="module")
def client(main_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=main_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def metric(url: str, name: str, key: str | None = None) -> float:
    """One sample of /metrics (``name`` with its labels, e.g. ``gsa_queue_depth``); 0 when absent."""
    return scrape(url, key).get(name, 0.0)


def poll(condition, what: str) -> None:
    deadline = time.monotonic() + POLL_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not seen within {POLL_S} s: {what}")


def chat(client: openai.OpenAI, content: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


# ----------------------------------------------------------------------------- the API
def test_the_model_list(client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_chat_completion(client) -> None:
    reply = chat(client, "Once upon a time", max_tokens=8, **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_a_streamed_chat_completion_equals_the_whole_one(client) -> None:
    whole = chat(client, "The dog ran to the park", max_tokens=12, **GREEDY)
    chunks = list(chat(client, "The dog ran to the park", max_tokens=12, stream=True,
                       stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert "".join(deltas) == whole.choices[0].message.content and finishes == ["length"]
    assert sum(1 for d in deltas if d) >= 2  # text arrived in pieces
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_a_completion_streamed_and_not(client) -> None:
    whole = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, **GREEDY)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    streamed = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=[1, 40, 41], max_tokens=3, **GREEDY)
    assert by_ids.usage.prompt_tokens == 3


def test_stop_strings_cut_the_reply(client) -> None:
    text = chat(client, "A story about a cat", max_tokens=24, **GREEDY).choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip())
    cut = text[:text.find(stop)]
    stopped = chat(client, "A story about a cat", max_tokens=24, stop=[stop, "never-seen"], **GREEDY)
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    streamed = chat(client, "A story about a cat", max_tokens=24, stop=stop, stream=True, **GREEDY)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_temperature_zero_answers_alike_and_a_seed_repeats_a_sample(client) -> None:
    first, second = (chat(client, "Return the sum", max_tokens=16, temperature=0).choices[0].message.content
                     for _ in range(2))
    assert first == second
    sampled = [chat(client, "Return the sum", max_tokens=16, temperature=1.0, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


BAD = [  # (endpoint, body, status, param)
    ("chat/completions", b"{not json", 400, None),
    ("chat/completions", b"[1, 2]", 400, None),
    ("chat/completions", {"model": MODEL}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400,
     "frobnicate"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400,
     "temperature"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400,
     "max_tokens"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")},
     400, "stop"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
     "logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "stream_options": {"include_usage": True}}, 400, None),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096}, 400,
     "max_tokens"),
    ("chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": ["one", "two"]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), BAD,
                         ids=[f"{i}-{b[0]}-{b[2]}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_its_status_and_an_openai_error(main_url, endpoint, body, status, param) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{main_url}/v1/{endpoint}", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and "Traceback" not in r.text


def test_other_http_errors_are_openai_errors_too(main_url) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for r, status in [(httpx.get(f"{main_url}/v1/chat/completions", headers=auth), 405),
                      (httpx.get(f"{main_url}/no/such/path", headers=auth), 404),
                      (httpx.post(f"{main_url}/v1/completions", headers=auth, content=b"x" * (9 << 20)), 413)]:
        assert r.status_code == status and r.json()["error"]["message"]


def test_the_openai_client_sees_bad_requests_as_its_own_errors(client) -> None:
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        chat(client, "hi", n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_a_wrong_or_missing_api_key_gets_401(main_url) -> None:
    wrong = openai.OpenAI(base_url=main_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for headers in ({}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer"}):
        r = httpx.post(f"{main_url}/v1/chat/completions", headers=headers, json={"model": MODEL, "messages": []})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{main_url}/metrics").status_code == 401
    assert httpx.get(f"{main_url}/health").status_code == 200  # the liveness probe needs no key


def test_sixteen_concurrent_streams_all_complete(main_url, client) -> None:
    prompts = ["Once upon a time", "def add", "The function raises", "A red ball"]
    alone = {p: chat(client, p, max_tokens=20, **GREEDY).choices[0].message.content for p in prompts}
    steps_before = metric(main_url, "gsa_batch_size_steps_count", KEY)
    single_before = metric(main_url, 'gsa_batch_size_steps_bucket{le="1.0"}', KEY)

    def stream(prompt: str) -> tuple[str, str, int]:
        chunks = list(chat(client, prompt, max_tokens=20, stream=True, stream_options={"include_usage": True},
                           **GREEDY))
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), finish, \
            chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, [prompts[i % 4] for i in range(16)]))
    for i, (text, finish, tokens) in enumerate(results):
        assert (finish, tokens) == ("length", 20) and text == alone[prompts[i % 4]], i
    steps = metric(main_url, "gsa_batch_size_steps_count", KEY) - steps_before
    batched = steps - (metric(main_url, 'gsa_batch_size_steps_bucket{le="1.0"}', KEY) - single_before)
    assert batched > 0  # some decode steps ran several streams in one forward
    assert metric(main_url, "gsa_active_sessions", KEY) == 0


def test_a_follow_up_turn_continues_the_cached_prefix_state(client) -> None:
    messages = [{"role": "system", "content": "Stories."}, {"role": "user", "content": "The cat liked to play"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **GREEDY)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "in the sun"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > second.usage.prompt_tokens_details.cached_tokens


def test_metrics_cover_the_monitor(main_url, client) -> None:
    for _ in range(2):  # the second is a prefix-cache hit
        chat(client, "Counting requests", max_tokens=2, **GREEDY)
    httpx.post(f"{main_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"model": MODEL})
    text = httpx.get(main_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("gsa_requests_total", "gsa_time_to_first_token_seconds_bucket",
                 "gsa_inter_token_latency_seconds_bucket", "gsa_generated_tokens_total", "gsa_decode_tokens_per_second",
                 "gsa_queue_depth", "gsa_active_sessions", "gsa_batch_size", "gsa_state_bytes",
                 "gsa_prefix_cache_hits_total", "gsa_prefix_cache_misses_total", "gsa_prefix_cache_bytes"):
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), name
    assert re.search(r'^gsa_requests_total\{endpoint="/v1/chat/completions",status="400"\} [1-9]', text, re.MULTILINE)
    assert metric(main_url, "gsa_prefix_cache_hits_total", KEY) >= 1
    assert metric(main_url, "gsa_prefix_cache_bytes", KEY) > 0


def test_log_json_writes_one_line_per_request(servers, main_url, client) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    httpx.post(f"{main_url}/v1/chat/completions", headers=auth, json={"model": MODEL})  # 400
    httpx.get(f"{main_url}/v1/models")  # 401
    httpx.get(f"{main_url}/nowhere", headers=auth)  # 404
    reply = chat(client, "Once", max_tokens=3, **GREEDY)
    poll(lambda: any(reply.id in line for line in servers["main"].stdout), "the request's log line")
    lines = [json.loads(line) for line in servers["main"].stdout]  # every stdout line is one JSON object
    mine = [line for line in lines if line.get("request_id") == reply.id]
    assert len(mine) == 1 and mine[0]["status"] == 200 and mine[0]["completion_tokens"] == 3
    assert mine[0]["path"] == "/v1/chat/completions" and mine[0]["finish_reason"] == "length"
    assert {line["status"] for line in lines} >= {200, 400, 401, 404}


def test_served_conversations_are_stored_for_gsa_logs(client, home, monkeypatch, capsys) -> None:
    from gsa_cli.main import main

    messages = [{"role": "user", "content": "Remember the red ball"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **GREEDY)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "and the dog"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **GREEDY)
    monkeypatch.setenv("GSA_HOME", str(home))

    def stored():
        capsys.readouterr()
        assert main(["logs", "list", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["sessions"]

    poll(lambda: any(s["messages"] == 4 for s in stored()), "a stored 4-message session")
    session = next(s for s in stored() if s["messages"] == 4)
    assert main(["logs", "show", str(session["id"]), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [m["content"] for m in shown["messages"]][::2] == ["Remember the red ball", "and the dog"]


# ----------------------------------------------------------------------------- overload, disconnects, SIGTERM
def test_a_client_leaving_a_non_streamed_request_cancels_it(tight_url) -> None:
    before = metric(tight_url, 'gsa_generations_total{finish_reason="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes its connection
        httpx.post(f"{tight_url}/v1/completions", timeout=httpx.Timeout(30.0, read=1.0),
                   json={"model": MODEL, "prompt": "Once", "max_tokens": 3000, "ignore_eos": True})
    poll(lambda: metric(tight_url, 'gsa_generations_total{finish_reason="cancelled"}') == before + 1,
         "the abandoned request cancelled")
    poll(lambda: metric(tight_url, "gsa_active_sessions") == 0, "its slot freed")


def test_a_full_queue_gets_429_and_a_disconnect_frees_the_slot(tight_url) -> None:
    cancelled = 'gsa_generations_total{finish_reason="cancelled"}'
    before = metric(tight_url, cancelled)
    client = openai.OpenAI(base_url=tight_url + "/v1", api_key="none", max_retries=0, timeout=120)
    long = {"max_tokens": 3000, "stream": True, **GREEDY}
    running = chat(client, "Once upon a time", **long)
    next(iter(running))
    poll(lambda: metric(tight_url, "gsa_active_sessions") == 1, "the first stream holding the slot")
    waiting = chat(client, "def add", **long)
    poll(lambda: metric(tight_url, "gsa_queue_depth") == 1, "the second stream queued")
    with pytest.raises(openai.RateLimitError) as info:
        chat(client, "hi", max_tokens=2)
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == "queue_full"
    running.close()  # the client goes away mid-stream
    poll(lambda: metric(tight_url, cancelled) == before + 1, "the first stream cancelled")
    poll(lambda: metric(tight_url, "gsa_queue_depth") == 0, "the waiting stream admitted to the freed slot")
    assert metric(tight_url, "gsa_active_sessions") == 1
    waiting.close()
    poll(lambda: metric(tight_url, "gsa_active_sessions") == 0, "the second stream's slot freed")
    assert metric(tight_url, cancelled) == before + 2
    assert metric(tight_url, 'gsa_requests_total{endpoint="/v1/chat/completions",status="429"}') == 1


def test_sigterm_stops_accepting_and_lets_the_running_stream_finish(servers, tight_url) -> None:
    client = openai.OpenAI(base_url=tight_url + "/v1", api_key="none", max_retries=0, timeout=120)
    stream = chat(client, "The dog ran", max_tokens=1500, stream=True, stream_options={"include_usage": True},
                  **GREEDY)
    next(iter(stream))
    outcome: dict[str, object] = {}

    def read() -> None:
        chunks = list(stream)
        outcome["finish"] = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        outcome["tokens"] = chunks[-1].usage.completion_tokens

    reader = threading.Thread(target=read)
    reader.start()
    servers["tight"].proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            httpx.get(tight_url + "/health", timeout=2)
        except httpx.ConnectError:
            return True
        return False

    poll(refused, "new connections refused after SIGTERM")
    assert "finish" not in outcome  # the stream was still running when the server stopped accepting
    reader.join(120)
    assert outcome == {"finish": "length", "tokens": 1500}
    assert servers["tight"].proc.wait(60) == 0
