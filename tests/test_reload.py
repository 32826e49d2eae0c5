"""`mertools serve --config FILE`: the settings file, and reloading it (SIGHUP, --watch-config) under streaming
clients: a new API key, a smaller then larger cache, an invalid file, a new layout; every stream equals its solo
answer, the new settings apply, the cache's memory follows its budget. Also Engine.resize_cache on its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.errors import RuntimeConfigError
from mertools.runtime.engine import Engine
from mertools.runtime.memory import resident_bytes
from mertools.server.config import ServerConfig, read_settings, with_file

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained" / "tiny-shakespeare-moe"
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:", "To be, or not", "My lord,", "HAMLET:", "Enter"]
HUGE_PAGE = 2 << 20  # the arena asks for transparent huge pages: one may back a little past the slots in use


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reload")
    return {t: convert(TRAINED, d / t, ConvertOptions(dtype=t, progress=False)).out for t in ("q8_0", "q4_0")}


# ---------------------------------------------------------------------- the file
def test_settings_file_checks_and_merges(tmp_path: Path) -> None:
    f = tmp_path / "serve.toml"
    f.write_text('layout = "models/x"\napi_keys = ["a", "b"]\ncache_mb = 64\nmax_concurrency = 4\nkv_type = "q8_0"\n'
                 'temperature = 0.7\nlog_level = "debug"\nprefetch_depth = 3\n')
    got = read_settings(f)
    assert got == {"layout": str(tmp_path / "models" / "x"), "api_keys": ("a", "b"), "cache_mb": 64.0,
                   "max_concurrency": 4, "kv_dtype": "q8_0", "temperature": 0.7, "log_level": "debug",
                   "prefetch_depth": 3}
    base = ServerConfig(layout="cli-layout", max_concurrency=2, api_key="c", pinned=frozenset({"max_concurrency"}))
    cfg = with_file(base, got)
    assert (cfg.layout, cfg.max_concurrency, cfg.cache_mb, cfg.kv_dtype) == (got["layout"], 2, 64.0, "q8_0")
    assert cfg.keys == ("a", "b", "c")  # the command line's key is accepted beside the file's
    for text, message in [("cache_mb = -1\n", "cache_mb: must lie in"),
                          ('cache_mb = "lots"\n', "cache_mb: must be a number"),
                          ("max_queue = 1.5\n", "max_queue: must be an integer"),
                          ("max_concurrency = true\n", "max_concurrency"),
                          ('prefetch = "sometimes"\n', "prefetch: must be one of"),
                          ("prefetch_depth = 0\n", "prefetch_depth: must lie in"),
                          ('api_keys = "k"\n', "api_keys: must be a list"),
                          ("cache_size = 3\n", "unknown key 'cache_size'"), ("cache_mb = \n", "not valid TOML"),
                          ("top_p = 1.5\n", "top_p: must lie in")]:
        f.write_text(text)
        with pytest.raises(ValueError) as e:
            read_settings(f)
        assert str(e.value).startswith(f"{f}: ") and message in str(e.value), (text, str(e.value))
    with pytest.raises(ValueError, match="cannot read"):
        read_settings(tmp_path / "absent.toml")


# ---------------------------------------------------------------------- the engine alone
def _greedy(eng: Engine, prompt: str, n: int = 40) -> str:
    return "".join(t.text for t in eng.generate(prompt, max_tokens=n))


def test_engine_resize_cache_gives_memory_back_and_keeps_the_output(layouts: dict[str, Path]) -> None:
    with Engine.open(layouts["q8_0"], cache_mb=6, kernels="int8") as eng:
        slot, arena = eng.store.slot_bytes, eng.store.arena_bytes
        used = lambda: resident_bytes(arena.ctypes.data, arena.nbytes)  # noqa: E731
        ref = [_greedy(eng, p) for p in PROMPTS[:3]]
        full = used()
        assert eng.cache.n_slots == 6 * 2**20 // slot and full >= 20 * slot  # most slots filled
        assert eng.resize_cache(1.0) == 2**20 // slot == eng.cache.n_slots
        assert used() <= eng.cache.n_slots * slot + HUGE_PAGE < full
        assert [_greedy(eng, p) for p in PROMPTS[:3]] == ref  # streaming through 5 slots: the same text
        assert len(eng.cache.entries) <= eng.cache.n_slots
        small = used()
        assert eng.resize_cache(8.0) == eng.cache.capacity == 32  # every expert
        assert [_greedy(eng, p) for p in PROMPTS[:3]] == ref
        assert used() > small + 10 * slot  # the new slots filled as experts were read
        with pytest.raises(RuntimeConfigError, match="smaller than one layer's active experts"):
            eng.resize_cache(0.2)
        assert eng.cache.n_slots == 32


# ---------------------------------------------------------------------- the server, reloaded under load
def _wait_healthy(proc: subprocess.Popen, url: str, output: Any, timeout: float = 120) -> None:  # noqa: ANN401
    """Until GET url/health says 200; the process must stay up meanwhile (`output()` tells why it did not)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, output()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


class Served:
    """`mertools serve --config FILE` in a process of its own."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.config = f"http://127.0.0.1:{self.port}", config
        self.log = open(config.with_suffix(".log"), "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "mertools.cli", "serve", "--config", str(config),
                                      "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        _wait_healthy(self.proc, self.url, self.output)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health").json()

    def stats(self, key: str) -> dict[str, Any]:
        return httpx.get(self.url + "/stats", headers={"Authorization": f"Bearer {key}"} if key else {}).json()

    def reload(self, text: str) -> dict[str, Any]:
        """Write the file, send SIGHUP, wait for the reload's outcome."""
        before = (self.health()["config"]["last"] or {}).get("at")
        self.config.write_text(text)
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while (last := self.health()["config"]["last"]) is None or last["at"] == before:
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.02)
        return last

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self.log.close()


def _stream(c: OpenAI, model: str, prompt: str, n: int) -> tuple[str, list[float]]:
    """A streamed greedy completion: its text and each piece's arrival time."""
    text, times = [], []
    for chunk in c.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            text.append(chunk.choices[0].text)
            times.append(time.monotonic())
    return "".join(text), times


def _under_load(srv: Served, key: str, model: str, action: Any, n: int = 200) -> tuple[list[str], Any, float]:  # noqa: ANN401
    """8 concurrent streams; `action()` runs once each has its first piece. Returns the texts, what the action
    returned and when it ended; every stream must still have been going then."""
    out: list[Any] = [None] * len(PROMPTS)
    c = srv.client(key)

    def run(i: int) -> None:
        try:
            out[i] = _stream(c, model, PROMPTS[i], n)
        except Exception as e:  # reported below with the others
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while srv.stats(key)["tokens"]["generated"] < len(PROMPTS) * 2:  # each has begun
        assert time.monotonic() < deadline
        time.sleep(0.005)
    result = action()
    done = time.monotonic()
    for t in threads:
        t.join(120)
    errors = [o for o in out if isinstance(o, Exception)]
    assert not errors, errors
    assert any(times[-1] > done for _, times in out), "every stream ended before the reload was applied"
    return [text for text, _ in out], result, done


@pytest.fixture(scope="module")
def served(layouts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = tmp_path_factory.mktemp("serve") / "serve.toml"
    config.write_text(f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\napi_keys = ["k1"]\ncache_mb = 6\n')
    srv = Served(config)
    c = srv.client("k1")
    solo = [c.completions.create(model="bard", prompt=p, max_tokens=200, temperature=0).choices[0].text for p in PROMPTS]
    yield srv, solo
    srv.stop()


def test_reload_a_new_api_key_under_streams(served: Any, layouts: dict[str, Path]) -> None:
    srv, solo = served
    texts, last, _ = _under_load(srv, "k1", "bard", lambda: srv.reload(
        f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\napi_keys = ["k2"]\ncache_mb = 6\n'))
    assert texts == solo  # streams opened with the old key run to the end, unchanged
    assert last["ok"] and last["changed"] == ["api_keys"]
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 401
    assert srv.client("k2").models.list().data[0].id == "bard"
    srv.reload(f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\napi_keys = ["k1"]\ncache_mb = 6\n')


def test_reload_a_smaller_then_larger_cache_under_streams(served: Any, layouts: dict[str, Path]) -> None:
    srv, solo = served
    head = f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\napi_keys = ["k1"]\n'
    before = srv.stats("k1")["cache"]
    assert before["arena_rss_bytes"] > 15 * before["slot_bytes"]  # the solo answers filled most of the 6 MiB
    texts, last, _ = _under_load(srv, "k1", "bard", lambda: srv.reload(head + "cache_mb = 1\n"))
    assert texts == solo and last["ok"] and last["changed"] == ["cache_mb"], last
    small = srv.stats("k1")["cache"]
    assert small["slots"] == small["budget_bytes"] // small["slot_bytes"] == 2**20 // before["slot_bytes"]
    assert small["resident"] + small["loading"] <= small["slots"], small
    assert small["arena_rss_bytes"] <= small["budget_bytes"] + HUGE_PAGE < before["arena_rss_bytes"], (small, before)
    texts, last, _ = _under_load(srv, "k1", "bard", lambda: srv.reload(head + "cache_mb = 6\n"))
    assert texts == solo and last["ok"], last
    large = srv.stats("k1")["cache"]
    assert large["slots"] == before["slots"], (large, before)
    assert large["arena_rss_bytes"] > small["budget_bytes"] + HUGE_PAGE, (large, small)


def test_reload_an_invalid_file_keeps_the_running_settings(served: Any, layouts: dict[str, Path]) -> None:
    srv, solo = served
    before = srv.stats("k1")
    texts, last, _ = _under_load(srv, "k1", "bard", lambda: srv.reload(
        f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\napi_keys = ["k1"]\ncache_mb = "lots"\n'))
    assert texts == solo
    assert not last["ok"] and last["message"] == f"{srv.config}: cache_mb: must be a number, not 'lots'"
    after = srv.stats("k1")
    assert after["cache"]["slots"] == before["cache"]["slots"] and after["config"]["failed"] == before["config"]["failed"] + 1
    logged = [line for line in srv.output().splitlines() if "reload refused" in line]
    assert logged and str(srv.config) in logged[-1] and "cache_mb" in logged[-1]
    # a budget the engine refuses (below one layer's experts) changes nothing either, the other keys included
    last = srv.reload(f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\napi_keys = ["k9"]\ncache_mb = 0.1\n')
    assert not last["ok"] and "cache_mb" in last["message"] and "smaller than one layer" in last["message"]
    assert srv.client("k1").models.list().data[0].id == "bard"
    srv.reload(f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\napi_keys = ["k1"]\ncache_mb = 6\n')


def test_reload_a_new_layout_switches_when_the_streams_end(served: Any, layouts: dict[str, Path]) -> None:
    srv, solo = served
    texts, last, _ = _under_load(srv, "k1", "bard", lambda: srv.reload(
        f'layout = "{layouts["q4_0"]}"\nmodel_name = "bard-q4"\napi_keys = ["k1"]\ncache_mb = 3\n'))
    assert texts == solo  # the streams in flight ended on the old layout, unchanged
    assert last["ok"] and set(last["changed"]) == {"layout", "model_name", "cache_mb"}
    deadline = time.monotonic() + 60
    while srv.health()["config"]["pending"] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    st = srv.stats("k1")
    assert st["layout"] == str(layouts["q4_0"]) and st["model"] == "bard-q4"
    assert st["cache"]["slots"] == 3 * 2**20 // st["cache"]["slot_bytes"]
    c = srv.client("k1")
    new_solo = [c.completions.create(model="bard-q4", prompt=p, max_tokens=200, temperature=0).choices[0].text
                for p in PROMPTS]
    texts, _, _ = _under_load(srv, "k1", "bard-q4", lambda: srv.stats("k1"))
    assert texts == new_solo
    with Engine.open(layouts["q4_0"], cache_mb=3, kernels="int8") as eng:  # the q4_0 layout's own answer
        assert _greedy(eng, PROMPTS[0], 200) == new_solo[0]
    # the old model's name is gone with it
    assert httpx.post(srv.url + "/v1/completions", headers={"Authorization": "Bearer k1"},
                      json={"model": "bard", "prompt": "x", "max_tokens": 1}).status_code == 404


def test_watch_config_reloads_when_the_file_changes(layouts: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'layout = "{layouts["q4_0"]}"\nmax_concurrency = 2\n')
    srv = Served(config, "--watch-config", "0.2", "--max-queue", "5")
    try:
        assert srv.stats("")["requests"]["max_concurrency"] == 2
        # kubelet's way: the file replaced (a new inode), no signal
        (tmp_path / "next.toml").write_text(f'layout = "{layouts["q4_0"]}"\nmax_concurrency = 3\nmax_queue = 9\n')
        os.replace(tmp_path / "next.toml", config)
        deadline = time.monotonic() + 30
        while srv.stats("")["requests"]["max_concurrency"] != 3:
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.05)
        assert srv.stats("")["requests"]["max_queue"] == 5  # given on the command line: the file cannot change it
        assert srv.health()["config"]["reloads"] == 1
    finally:
        srv.stop()


def test_a_new_layout_under_numbas_workqueue_layer_loads_between_steps(layouts: dict[str, Path], tmp_path: Path) -> None:
    """numba's workqueue threading layer (no OpenMP library) aborts the process when two threads run parallel
    kernels at once: the new layout is then opened in the scheduler's thread, between steps."""
    config = tmp_path / "serve.toml"
    config.write_text(f'layout = "{layouts["q8_0"]}"\nmodel_name = "bard"\ncache_mb = 6\n')
    srv = Served(config, env={"NUMBA_THREADING_LAYER": "workqueue"})
    try:
        c = srv.client("")
        solo = [c.completions.create(model="bard", prompt=p, max_tokens=100, temperature=0).choices[0].text
                for p in PROMPTS]
        texts, last, _ = _under_load(srv, "", "bard", lambda: srv.reload(
            f'layout = "{layouts["q4_0"]}"\nmodel_name = "bard-q4"\ncache_mb = 3\n'), n=100)
        assert texts == solo and last["ok"]
        assert c.completions.create(model="bard-q4", prompt="ROMEO:", max_tokens=5).usage.completion_tokens == 5
        assert srv.proc.poll() is None
    finally:
        srv.stop()


def test_sighup_without_a_config_file_is_ignored(layouts: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "mertools.cli", "serve", str(layouts["q4_0"]), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}", lambda: "")
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.seek(0)
        out = log.read()
        log.close()
    assert "SIGHUP ignored: no --config file to reload" in out and proc.returncode == 0
