"""`mertools serve`: the real server (uvicorn on 127.0.0.1) driven by the official openai client, and the
continuous-batching scheduler on its own with a scripted engine."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from mertools.layout import Layout
from mertools.runtime.chat import encode_chat
from mertools.runtime.engine import Engine
from mertools.runtime.sampling import SamplingParams
from mertools.runtime.text import GenerationText, TextAssembler
from mertools.server.app import ServerConfig, create_app
from mertools.server.scheduler import Event, GenerationRequest, NotReady, QueueFull, Scheduler

KEY = "sk-test-123"
PROMPTS = ["The old lighthouse keeper", "Once upon a time", "In a hole in the ground", "It was a bright cold day",
           "Call me Ishmael", "A screaming comes across", "Many years later", "The sky above the port"]


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def layout(tiny_q4_0: Path) -> Path:
    return tiny_q4_0


def cache_mb(layout: Path) -> float:
    """One layer's active experts plus a little: most expert lookups really read the disk."""
    need = Layout.open(layout).manifest.config.n_experts_used
    return (need + 0.5) * max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20


@pytest.fixture(scope="module")
def reference(layout: Path) -> dict[str, Any]:
    """Engine.generate's greedy text, computed before any server engine runs (numba calls stay serial)."""
    with Engine.open(layout) as eng:
        text = "".join(t.text for t in eng.generate(PROMPTS[0], max_tokens=24))
        return {"text": text, "tokenizer": eng.tokenizer, "context": eng.config.context_length}


class Running:
    def __init__(self, app: Any) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # the server gets the bound socket: no race for the port
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "engine did not load"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def srv(layout: Path, reference: dict) -> Iterator[Running]:
    app = create_app(ServerConfig(str(layout), api_key=KEY, cache_mb=cache_mb(layout), max_concurrency=8, max_queue=16))
    r = Running(app)
    r.wait_healthy()
    yield r
    r.stop()


@pytest.fixture
def client(srv: Running) -> OpenAI:
    return OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(url: str, key: str | None = KEY) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([^#\s][^ ]*) (\S+)$", text, re.M)}


# ---------------------------------------------------------------------- the HTTP API
def test_health_models_and_api_key(srv: Running, client: OpenAI) -> None:
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}  # open without a key
    assert [m.id for m in client.models.list().data] == ["tiny-q4"]
    assert client.models.retrieve("tiny-q4").id == "tiny-q4"
    bad = OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny-q4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(srv.url + "/metrics")
    assert r.status_code == 401 and set(r.json()["error"]) >= {"message", "type", "code"}


def test_chat_completion_and_usage(client: OpenAI, reference: dict) -> None:
    msgs = [{"role": "user", "content": "Tell me about lighthouses."}]
    r = client.chat.completions.create(model="tiny-q4", messages=msgs, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant" and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(encode_chat(reference["tokenizer"], msgs))  # the model's own template
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    # max_completion_tokens is the newer name of the same limit; content parts are joined text
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "lighthouses."}]}]
    r2 = client.chat.completions.create(model="tiny-q4", messages=parts, max_completion_tokens=12, temperature=0)
    assert r2.choices[0].message.content == c.message.content


def test_greedy_completion_equals_engine_generate(client: OpenAI, reference: dict) -> None:
    kw = dict(model="tiny-q4", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    r = client.completions.create(**kw, extra_body={"skip_special_tokens": False})
    assert r.object == "text_completion" and r.choices[0].text == reference["text"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24
    # streamed: the same text, in pieces, no usage unless asked for
    chunks = list(client.completions.create(**kw, stream=True, extra_body={"skip_special_tokens": False}))
    assert all(ch.object == "text_completion" and ch.usage is None for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == reference["text"]
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"
    # by default special tokens (<s>...) add no text, as OpenAI-style servers do
    plain = client.completions.create(**kw).choices[0].text
    assert plain == reference["text"].replace("<s>", "").replace("</s>", "")


def test_chat_streaming_with_include_usage(client: OpenAI) -> None:
    msgs = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny-q4", messages=msgs, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-q4", messages=msgs, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and len({ch.id for ch in chunks}) == 1 for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(ch.usage is None for ch in body)
    assert body[-1].choices[0].finish_reason == "length" and all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == whole.choices[0].message.content


def test_raw_sse_format(srv: Running) -> None:
    body = {"model": "tiny-q4", "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings(client: OpenAI) -> None:
    kw = dict(model="tiny-q4", prompt=PROMPTS[1], temperature=0, max_tokens=40)
    full = client.completions.create(**kw).choices[0].text
    stop = next(full[i:i + 3] for i in range(5, len(full) - 3) if full[i:i + 3].strip() and full[i:i + 3] not in full[:i + 2])
    want = full[:full.find(stop)]
    for stops in (stop, [stop], ["never-appears-xyz", stop]):
        r = client.completions.create(**kw, stop=stops)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
        streamed = list(client.completions.create(**kw, stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == want and streamed[-1].choices[0].finish_reason == "stop"
    assert client.completions.create(**kw, stop="never-appears-xyz").choices[0].text == full


def test_seeds(client: OpenAI) -> None:
    kw = dict(model="tiny-q4", prompt=PROMPTS[2], temperature=1.0, top_p=0.95, max_tokens=16)
    a = client.completions.create(**kw, seed=7).choices[0].text
    assert client.completions.create(**kw, seed=7).choices[0].text == a
    assert client.completions.create(**kw, seed=8).choices[0].text != a
    k = client.completions.create(**kw, seed=7, extra_body={"top_k": 1}).choices[0].text
    assert k == client.completions.create(model="tiny-q4", prompt=PROMPTS[2], temperature=0, max_tokens=16).choices[0].text


def test_several_choices_and_prompts(client: OpenAI) -> None:
    one = client.completions.create(model="tiny-q4", prompt=PROMPTS[3], temperature=0, max_tokens=8)
    r = client.completions.create(model="tiny-q4", prompt=[PROMPTS[3], PROMPTS[4]], temperature=0, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == one.choices[0].text
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > one.usage.prompt_tokens
    msgs = [{"role": "user", "content": "Hi"}]
    c = client.chat.completions.create(model="tiny-q4", messages=msgs, n=3, seed=5, temperature=1.0, max_tokens=10)
    assert [x.index for x in c.choices] == [0, 1, 2] and c.usage.completion_tokens == 30
    assert len({x.message.content for x in c.choices}) > 1  # each choice samples with its own seed
    again = client.chat.completions.create(model="tiny-q4", messages=msgs, n=3, seed=5, temperature=1.0, max_tokens=10)
    assert [x.message.content for x in again.choices] == [x.message.content for x in c.choices]
    chunks = list(client.chat.completions.create(model="tiny-q4", messages=msgs, n=3, seed=5, temperature=1.0,
                                                 max_tokens=10, stream=True))
    for i in range(3):
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].index == i)
        assert text == c.choices[i].message.content


@pytest.mark.parametrize("body, status, needle", [
    (b'{"model": "tiny-q4", "prompt": ', 400, "not valid JSON"),
    (b'{"model": "tiny-q4", "prompt": "' + b"x" * (17 * 2**20) + b'"}', 413, "larger than"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "tiny-q4", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny-q4", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny-q4", "prompt": "x", "max_tokens": 10**30}, 400, "context length"),
    ({"model": "tiny-q4", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny-q4", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny-q4", "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": "tiny-q4", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "tiny-q4", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "tiny-q4", "prompt": []}, 400, "prompt"),
    ({"model": "tiny-q4", "prompt": [1, 2, 100000]}, 400, "token ids"),
    ({"model": "tiny-q4", "prompt": "word " * 700}, 400, "context length"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
])
def test_bad_completion_requests(srv: Running, body: Any, status: int, needle: str) -> None:
    check_error(srv, "/v1/completions", body, status, needle)


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "tiny-q4", "messages": []}, 400, "messages"),
    ({"model": "tiny-q4"}, 400, "messages"),
    ({"model": "tiny-q4", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny-q4", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny-q4", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "text"),
    # the model's own template refuses two assistant turns in a row (raise_exception)
    ({"model": "tiny-q4", "messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "alternate"),
    ({"model": "tiny-q4", "messages": [{"role": "user", "content": "word " * 700}]}, 400, "context length"),
    ({"model": "tiny-q4", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
])
def test_bad_chat_requests(srv: Running, body: Any, status: int, needle: str) -> None:
    check_error(srv, "/v1/chat/completions", body, status, needle)


def check_error(srv: Running, path: str, body: Any, status: int, needle: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(srv.url + path, content=content, headers={"Authorization": f"Bearer {KEY}",
                                                             "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and needle in err["message"], err
    assert httpx.get(srv.url + "/health").status_code == 200  # and the server is fine


def test_openai_client_error_classes(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="tiny-q4", prompt="x", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_eight_concurrent_streams_share_steps_and_match_solo_output(srv: Running, client: OpenAI) -> None:
    def run(prompt: str) -> str:
        chunks = client.chat.completions.create(model="tiny-q4", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=32, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    m0 = metrics(srv.url)
    solo = [run(p) for p in PROMPTS]
    m1 = metrics(srv.url)
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def worker(i: int) -> None:
        barrier.wait(10)
        results[i] = run(PROMPTS[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    m2 = metrics(srv.url)
    assert sorted(results) == list(range(8))
    for i in range(8):
        assert results[i] == solo[i], f"client {i}: batched output differs from its solo output"
    key_bytes, key_steps = "mertools_expert_bytes_read_total", "mertools_engine_steps_total"
    solo_bytes, batch_bytes = m1[key_bytes] - m0[key_bytes], m2[key_bytes] - m1[key_bytes]
    assert 0 < batch_bytes < 0.6 * solo_bytes, (solo_bytes, batch_bytes)
    # solo: one step per token (plus prefill); batched: far fewer steps for the same 8 x 32 tokens
    assert m2[key_steps] - m1[key_steps] < 0.5 * (m1[key_steps] - m0[key_steps])


def test_metrics_contents(srv: Running, client: OpenAI) -> None:
    client.completions.create(model="tiny-q4", prompt="Hi", max_tokens=4)
    httpx.post(srv.url + "/v1/completions", content=b"{", headers={"Authorization": f"Bearer {KEY}"})
    r = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.headers["content-type"].startswith("text/plain")
    m = metrics(srv.url)
    assert m['mertools_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m['mertools_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    for name in ("mertools_prompt_tokens_total", "mertools_generation_tokens_total", "mertools_expert_lookups_total",
                 "mertools_expert_cache_misses_total", "mertools_expert_bytes_read_total",
                 "mertools_time_to_first_token_seconds_count", "mertools_inter_token_latency_seconds_count",
                 "mertools_expert_read_latency_seconds_count", 'mertools_generations_finished_total{reason="length"}'):
        assert m[name] > 0, name
    assert "mertools_expert_cache_hits_total" in m
    assert m["mertools_requests_running"] == 0 and m["mertools_requests_waiting"] == 0
    assert m['mertools_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["mertools_time_to_first_token_seconds_count"]
    assert "# TYPE mertools_inter_token_latency_seconds histogram" in r.text


def test_metrics_parse_and_match_the_documented_list_and_the_engine(srv: Running, client: OpenAI) -> None:
    client.completions.create(model="tiny-q4", prompt="Hi", max_tokens=4)
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # exposed names: a counter's samples carry "_total", a histogram's "_bucket", "_sum", "_count"
    exposed = {f.name + "_total" if f.type == "counter" else f.name for f in families.values()}
    docs = (Path(__file__).resolve().parent.parent / "docs" / "SERVER.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(mertools_[a-z_]+)", docs.split("## Metrics", 1)[1]))
    assert exposed == documented, (exposed ^ documented)
    assert {f.type for f in families.values()} == {"counter", "gauge", "histogram"}
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]
    labels = {f.name: {k for s in f.samples for k in s.labels if k != "le"} for f in families.values()}
    assert labels["mertools_requests"] == {"endpoint", "status"} and labels["mertools_generations_finished"] == {"reason"}
    # the engine's figures are its own totals, read at scrape time (nothing in flight now)
    engine = srv.app.state.scheduler.engine
    value = {s.name + str(sorted(s.labels.items())): s.value for f in families.values() for s in f.samples}
    assert value["mertools_expert_lookups_total[]"] == engine.cache.stats.lookups > 0
    assert value["mertools_expert_bytes_read_total[]"] == engine.store.bytes_read
    reads = engine.store.read_latency
    assert value["mertools_expert_read_latency_seconds_count[]"] == reads.count > 0
    assert value["mertools_expert_read_latency_seconds_bucket[('le', '+Inf')]"] == reads.count
    assert value["mertools_expert_read_latency_seconds_sum[]"] == pytest.approx(reads.sum)


# ---------------------------------------------------------------------- loading, queue limit, disconnects
class SlowEngine:
    """The real engine, each step made slow enough that a request is surely still running when the
    test acts on it."""

    def __init__(self, engine: Engine, delay: float) -> None:
        self._engine, self._delay = engine, delay

    def step(self, items: list) -> list:
        time.sleep(self._delay)
        return self._engine.step(items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_loading_queue_limit_and_disconnects(layout: Path, srv: Running) -> None:
    gate = threading.Event()

    def load() -> SlowEngine:
        assert gate.wait(30)
        return SlowEngine(Engine.open(layout, cache_mb=cache_mb(layout)), 0.02)

    app = create_app(ServerConfig(str(layout), max_concurrency=1, max_queue=1), load=load)
    r = Running(app)
    try:
        h = httpx.get(r.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        busy = httpx.post(r.url + "/v1/completions", json={"model": "tiny-q4", "prompt": "x"})
        assert busy.status_code == 503 and busy.headers["retry-after"] and busy.json()["error"]["code"] == "model_not_ready"
        gate.set()
        r.wait_healthy()
        body = {"model": "tiny-q4", "prompt": "x", "temperature": 0, "stream": True}  # greedy: no EOS for 400+ tokens
        with httpx.Client(base_url=r.url, timeout=30) as a, httpx.Client(base_url=r.url, timeout=30) as b:
            with a.stream("POST", "/v1/completions", json={**body, "max_tokens": 400}) as long:  # ~8 s if left alone
                lines = long.iter_lines()  # kept: a dropped iter_lines() generator closes the response
                assert next(lines).startswith("data: {")
                with b.stream("POST", "/v1/completions", json={**body, "max_tokens": 5}) as queued:
                    full = httpx.post(r.url + "/v1/completions", json={**body, "stream": False})
                    assert full.status_code == 429 and full.headers["retry-after"] == "1"
                    assert full.json()["error"]["code"] == "rate_limit_exceeded"
                    long.close()  # the client goes away: its slot goes to the queued request
                    t0 = time.monotonic()
                    events = [json.loads(x[6:]) for x in queued.iter_lines() if x.startswith("data: {")]
                    assert events[-1]["choices"][0]["finish_reason"] == "length" and time.monotonic() - t0 < 5
        m = wait_metrics(r.url, lambda m: m.get('mertools_generations_finished_total{reason="cancelled"}') == 1)
        assert m["mertools_generation_tokens_total"] < 100  # the 400-token request stopped early
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(r.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 400}, timeout=0.3)
        m = wait_metrics(r.url, lambda m: m.get('mertools_generations_finished_total{reason="cancelled"}') == 2)
        assert m["mertools_requests_running"] == 0 and m["mertools_generation_tokens_total"] < 200
    finally:
        gate.set()
        r.stop()


def wait_metrics(url: str, ok: Callable[[dict[str, float]], bool], timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not ok(m := metrics(url, None)):
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if "finished" in k or "running" in k or "tokens" in k}
        time.sleep(0.05)
    return m


def test_serve_command(layout: Path, srv: Running) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "from mertools.server.cli import serve; serve()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(layout), "--port", str(port), "--max-concurrency", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert c.completions.create(model="tiny-q4", prompt="Hi", max_tokens=3).usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    bad = subprocess.run([sys.executable, "-c", code, str(layout.parent)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "manifest" in bad.stderr.lower()
    # the engine loads after the socket is up; when it cannot, the server stops with exit status 2
    small = subprocess.run([sys.executable, "-c", code, str(layout), "--port", str(port), "--cache-mb", "0.01"],
                           capture_output=True, text=True, timeout=60)
    assert small.returncode == 2 and "cache-mb" in small.stderr, small.stderr


# ---------------------------------------------------------------------- the scheduler alone
class FakeTokenizer:
    eos_ids = frozenset({0})

    def stream(self, skip_special: bool = True) -> Any:
        return SimpleNamespace(feed=lambda i: chr(ord("a") + i % 26), flush=lambda: "")


class FakeEngine:
    """Logits that make greedy sampling emit prompt[-1] + 1, + 2...; records every step's items."""

    def __init__(self, vocab: int = 50, context: int = 256, fail_at: int | None = None) -> None:
        self.config = SimpleNamespace(context_length=context, vocab_size=vocab)
        self.tokenizer = FakeTokenizer()
        self.steps: list[list[tuple[int, int]]] = []  # (sequence id, tokens fed)
        self.fail_at, self.closed = fail_at, False

    def new_sequence(self, context: int | None = None) -> Any:
        return SimpleNamespace()

    def step(self, items: list) -> list[np.ndarray]:
        self.steps.append([(id(kv), len(ids)) for kv, ids in items])
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            raise OSError("disk on fire")
        out = []
        for _, ids in items:
            lg = np.zeros(self.config.vocab_size, np.float32)
            lg[max(1, (ids[-1] + 1) % self.config.vocab_size)] = 1
            if ids[-1] == 13:
                lg[:] = np.nan  # a broken sequence
            out.append(lg)
        return out

    def close(self) -> None:
        self.closed = True


def run_scheduler(engine: FakeEngine, reqs: list[GenerationRequest], **kw: Any) -> tuple[list[list[Event]], Scheduler]:
    s = Scheduler(lambda: engine, **kw).start()
    assert s.wait_ready(5)
    events: list[list[Event]] = [[] for _ in reqs]
    done = threading.Semaphore(0)

    def sink(i: int) -> Callable[[Event], None]:
        def on(ev: Event) -> None:
            events[i].append(ev)
            if ev.finish_reason:
                done.release()
        return on

    s.submit(reqs, [sink(i) for i in range(len(reqs))])
    for _ in reqs:
        assert done.acquire(timeout=10)
    return events, s


def test_scheduler_chunks_prompts_and_batches_decodes() -> None:
    eng = FakeEngine()
    long = GenerationRequest(tuple(range(1, 41)) * 4 + (3,), 5)  # 161 tokens: chunks of 64, 64, 33
    short = GenerationRequest((7,), 6)
    events, s = run_scheduler(eng, [short, long], prefill_chunk=64, max_running=4)
    s.close()
    assert eng.closed
    assert "".join(e.text for e in events[0]) == "ijklmn" and events[0][-1].finish_reason == "length"
    assert "".join(e.text for e in events[1]) == "efghi" and events[1][-1].completion_tokens == 5
    assert events[1][-1].prompt_tokens == 161
    fed = [sorted(n for _, n in step) for step in eng.steps]
    assert max(max(f) for f in fed) == 64  # no step reads more than a chunk of one prompt
    # the short request decodes in the same steps as the long prompt's chunks, never waiting for them
    assert [1, 64] in fed and [1, 33] in fed


def test_scheduler_limits_the_batch_and_the_queue() -> None:
    eng = FakeEngine()
    reqs = [GenerationRequest((i + 1,), 8) for i in range(5)]
    events, s = run_scheduler(eng, reqs, max_running=2, max_waiting=8)
    assert all(ev[-1].finish_reason == "length" for ev in events)
    assert max(len(step) for step in eng.steps) == 2
    with pytest.raises(ValueError, match="context"):
        s.submit([GenerationRequest(tuple([1] * 256), 1)], [lambda ev: None])
    s.close()
    blocked = threading.Event()
    eng2 = FakeEngine()
    s2 = Scheduler(lambda: (blocked.wait(5), eng2)[1], max_running=1, max_waiting=1)
    with pytest.raises(NotReady):
        s2.submit([GenerationRequest((1,), 1)], [lambda ev: None])
    s2.start()
    blocked.set()
    assert s2.wait_ready(5)
    original = eng2.step
    eng2.step = lambda items: (time.sleep(0.01), original(items))[1]
    h = s2.submit([GenerationRequest((1,), 200)] * 2, [lambda ev: None] * 2)  # one runs, one waits
    time.sleep(0.05)
    with pytest.raises(QueueFull):
        s2.submit([GenerationRequest((1,), 1)], [lambda ev: None])
    for x in h:
        x.cancel()
    deadline = time.monotonic() + 5
    while s2.n_running or s2.n_waiting:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s2.close()


def test_scheduler_survives_engine_errors_and_load_failures() -> None:
    eng = FakeEngine(fail_at=2)
    events, s = run_scheduler(eng, [GenerationRequest((1,), 5)])
    assert events[0][-1].finish_reason == "error" and "disk on fire" in events[0][-1].error
    events2: list[Event] = []
    done = threading.Event()
    s.submit([GenerationRequest((2,), 3)], [lambda ev: (events2.append(ev), ev.finish_reason and done.set())])
    assert done.wait(5) and events2[-1].finish_reason == "length"  # still serving
    s.close()
    # a sequence whose sampling fails ends alone; the one beside it goes on
    nan, fine = GenerationRequest((13,), 5, SamplingParams(1.0, seed=0)), GenerationRequest((20,), 5)
    events, s = run_scheduler(FakeEngine(), [nan, fine])
    assert events[0][-1].finish_reason == "error" and events[1][-1].finish_reason == "length"
    s.close()

    def broken() -> Any:
        raise OSError("no such layout")

    failed: list[str] = []
    s2 = Scheduler(broken, on_load_error=failed.append).start()
    assert not s2.wait_ready(5) and s2.state == "failed" and "no such layout" in failed[0]
    with pytest.raises(NotReady, match="no such layout"):
        s2.submit([GenerationRequest((1,), 1)], [lambda ev: None])


def test_text_assembler_cuts_at_the_first_stop_and_holds_back_only_what_may_be_one() -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc ") for _ in range(rng.randrange(1, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(0, 3))]
        asm = TextAssembler(SimpleNamespace(feed=text.__getitem__, flush=lambda: ""), stops)
        out, stopped = "", False
        for i in range(len(text)):
            got, stopped = asm.feed(i)
            out += got
            # what is held back could still become a stop string
            held = text[len(out):i + 1]
            assert stopped or not held or any(s.startswith(held) and len(s) > len(held) for s in stops)
            if stopped:
                break
        if not stopped:
            got, stopped = asm.finish()
            out += got
        # the first stop string to be completed ends the text, where it starts (as OpenAI streams do)
        want, want_stop = text, False
        for n in range(1, len(text) + 1):
            if hits := [j for j in (text[:n].find(s) for s in stops) if j >= 0]:
                want, want_stop = text[:min(hits)], True
                break
        assert out == want and stopped == want_stop, (text, stops)


def test_text_assembler_with_stop_strings_split_across_tokens() -> None:
    def run(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
        asm = TextAssembler(SimpleNamespace(feed=pieces.__getitem__, flush=lambda: ""), stops)
        out = []
        for i in range(len(pieces)):
            got, stopped = asm.feed(i)
            out.append(got)
            if stopped:
                return out, True
        got, stopped = asm.finish()
        return [*out, got], stopped

    # "world!" arrives over three tokens: "wo" is held from the second, nothing of it is ever shown
    assert run(["Hel", "lo wo", "rld", "! E", "ND"], ["world!", "END"]) == (["Hel", "lo ", "", ""], True)
    # a held tail that turns out not to be a stop string comes out with the token that decides it
    assert run(["a wor", "m", "s"], ["world"]) == (["a ", "worm", "s", ""], False)
    # only the longest tail that is really a prefix is held: "xab" holds "ab" of "abc", not "xab"
    assert run(["xab", "d"], ["abc", "zzzz"]) == (["x", "abd", ""], False)
    # a stop string inside one token cuts the text where it starts
    assert run(["one STOP two"], ["STOP"]) == (["one "], True)
    # at the end, held text is released (or cut, when the flushed rest completes a stop string)
    asm = TextAssembler(SimpleNamespace(feed=["ab"].__getitem__, flush=lambda: "c!"), ["abc"])
    assert asm.feed(0) == ("", False) and asm.finish() == ("", True)
    asm = TextAssembler(SimpleNamespace(feed=["ab"].__getitem__, flush=lambda: ""), ["abc"])
    assert asm.feed(0) == ("", False) and asm.finish() == ("ab", False)


def test_generation_text_ends_at_eos_stop_or_length() -> None:
    def dec() -> Any:
        return SimpleNamespace(feed=lambda i: "xyz"[i % 3], flush=lambda: "")

    g = GenerationText(dec(), ["yz"], eos_ids={9}, max_tokens=10)
    assert [g.push(i) for i in (0, 1, 2)] == [("x", None), ("", None), ("", "stop")]
    g = GenerationText(dec(), [], eos_ids={9}, max_tokens=10)
    assert [g.push(i) for i in (0, 9)] == [("x", None), ("", "stop")] and g.generated == 2
    g = GenerationText(dec(), ["zx"], eos_ids={9}, max_tokens=3)
    assert [g.push(i) for i in (0, 1, 2)] == [("x", None), ("y", None), ("z", "length")]
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationText(dec(), [], eos_ids=(), max_tokens=0)
