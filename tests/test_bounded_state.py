"""Bounded state: what the engine (its cache, store and prefetcher) and the server (scheduler, metrics)
keep does not grow with tokens read or requests served. A walker counts the entries of every list,
dict, set, deque and tuple and the size of every numpy array reachable from them, after N and after 3N
tokens (requests): the counts must be equal. The KV caches are left aside: they grow with the context
by design and are reset between generations."""

from __future__ import annotations

import os
import threading
import time
import types
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mertools.convert.pipeline import ConvertOptions, convert

CHECKPOINT = Path(__file__).resolve().parent.parent / "fixtures" / "trained" / "tiny-shakespeare-moe"
N = 100  # tokens; then 2N more
PROMPT = "ROMEO:"
# bounded by construction, or not state: thread pools hold at most max_workers threads (spawned lazily,
# so their number may still rise to it), a condition's waiters are threads blocked at that moment
SKIP = (Executor, threading.Thread, threading.Condition, types.ModuleType, type)
ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), Path, memoryview)


def retained(root: Any, skip: tuple[type, ...] = ()) -> dict[str, int]:
    """Entries per path of every container (list, tuple, dict, set, deque: len; numpy array: size)
    reachable from `root` through attributes, container items and closures, each object once."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("root", root)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, ATOMS) or isinstance(obj, SKIP + skip) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            counts[f"{path} (array)"] = obj.size
            continue
        for name, child in _children(obj):
            stack.append((f"{path}.{name}", child))
        if isinstance(obj, list | tuple | dict | set | frozenset | deque):
            counts[path] = len(obj)
    return counts


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for i, (k, v) in enumerate(obj.items()):
            yield f"[{i}]", k
            yield f"[{i}]", v
    elif isinstance(obj, list | tuple | set | frozenset | deque):
        yield from ((f"[{i}]", x) for i, x in enumerate(obj))
    elif isinstance(obj, types.FunctionType):
        yield from ((f"<cell {i}>", c.cell_contents) for i, c in enumerate(obj.__closure__ or ()) if _filled(c))
    elif isinstance(obj, types.MethodType):
        yield "__self__", obj.__self__
    else:
        yield from getattr(obj, "__dict__", {}).items()
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if isinstance(name, str) and hasattr(obj, name):
                    yield name, getattr(obj, name)


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {p: (before.get(p, 0), after.get(p, 0)) for p in sorted(set(before) | set(after))
            if before.get(p, 0) != after.get(p, 0)}


def settle(eng: Any, timeout: float = 30.0) -> None:
    """Wait until no expert load is in flight (speculative loads called off may still be finishing)."""
    deadline = time.monotonic() + timeout
    while True:
        with eng.cache.lock:
            if not any(e.loading for e in eng.cache.entries.values()) and not getattr(eng.cache, "speculative", ()):
                return
        assert time.monotonic() < deadline, "expert loads did not finish"
        time.sleep(0.01)


def engine_state(eng: Any) -> dict[str, int]:
    from mertools.runtime.model import KVCache

    settle(eng)
    return retained(eng, skip=(KVCache,))


# ---------------------------------------------------------------------- the histogram that replaced per-read lists
def test_latency_histogram_has_a_fixed_size_and_estimates_percentiles_within_a_bucket() -> None:
    from mertools.runtime.stats import BOUNDS, LatencyHistogram

    rng = np.random.default_rng(0)
    h = LatencyHistogram()
    size = len(retained(h))
    x = rng.lognormal(np.log(2e-3), 1.0, size=5000)
    for v in x:
        h.observe(float(v))
    assert len(retained(h)) == size and h.count == len(x) and h.sum == pytest.approx(x.sum())
    widest = max(b / a for a, b in zip(BOUNDS, BOUNDS[1:], strict=False))
    for p in (0, 1, 50, 95, 99, 100):
        assert 1 / widest <= h.percentile(p) / np.percentile(x, p) <= widest, p
    one = LatencyHistogram()
    one.observe(0.0123)
    assert one.percentile(50) == one.percentile(99) == 0.0123  # clamped to what was seen
    assert LatencyHistogram().percentile(50) == 0.0
    counts, total, n = h.cumulative([1e-4, 2.5e-4, 1e-3, 1.0])
    assert counts == [int((x <= b).sum()) for b in (1e-4, 2.5e-4, 1e-3, 1.0)] and n == len(x)
    with pytest.raises(ValueError, match="not one of"):
        h.cumulative([3e-4])
    with pytest.raises(ValueError, match="0..100"):
        h.percentile(101)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(CHECKPOINT, tmp_path_factory.mktemp("bounded") / "q4_0", ConvertOptions(dtype="q4_0", progress=False)).out


def generate(eng: Any, n: int, seed: int) -> int:
    return sum(1 for _ in eng.generate(PROMPT, max_tokens=n, temperature=1.0, seed=seed))


# ---------------------------------------------------------------------- the engine
@pytest.mark.parametrize("prefetch", ["lookahead", "markov"])
def test_engine_state_is_the_same_after_n_and_3n_tokens(q4: Path, prefetch: str) -> None:
    from mertools.runtime.engine import Engine

    with Engine.open(q4, cache_mb=1, prefetch=prefetch) as eng:
        assert eng.cache.n_slots < eng.config.n_layers * eng.config.n_experts  # experts are read all the time
        assert generate(eng, N, seed=1) == N
        first = engine_state(eng)
        reads = eng.stats()["bytes_read"]
        for seed in (2, 3):
            assert generate(eng, N, seed=seed) == N
        third = engine_state(eng)
        assert eng.stats()["bytes_read"] > 2 * reads  # it really kept streaming
        assert eng.stats()["generated_tokens"] == 3 * N
    assert sum(third.values()) == sum(first.values()), growth(first, third)


def test_store_keeps_a_bounded_number_of_files_open(q4: Path) -> None:
    from mertools.layout import Layout
    from mertools.runtime.store import ExpertStore

    layout = Layout.open(q4)
    keys = [(e.layer, e.expert) for e in layout.manifest.experts]
    for chunk in (None, 8 * 4096):  # one read per expert, and several chunks in flight
        store = ExpertStore(layout, 2, max_open_files=3, chunk_bytes=chunk)
        try:
            before = len(os.listdir("/proc/self/fd"))
            for i, key in enumerate(keys * 2):  # every expert twice: closed files are opened again
                store.load(key, i % 2)  # the xxh3 of every load is checked
            assert len(store._fds) == 3 and not store._fd_users
            assert len(os.listdir("/proc/self/fd")) <= before + 3
            assert store.read_latency.count == 2 * len(keys) > 3
        finally:
            store.close()


# ---------------------------------------------------------------------- the server
ROUNDS = 6  # each: a completion, a streamed chat with a stop string, a bad request, an unknown model


def serve_rounds(client: Any, n: int) -> None:
    for i in range(n):
        r = client.post("/v1/completions", json={"model": "q4_0", "prompt": PROMPT, "max_tokens": 4, "seed": i})
        assert r.status_code == 200, r.text
        body = {"model": "q4_0", "messages": [{"role": "user", "content": "Speak"}], "max_tokens": 4, "stream": True,
                "stop": ["\n\n"], "seed": i}
        with client.stream("POST", "/v1/chat/completions", json=body) as s:
            assert s.status_code == 200 and [ln for ln in s.iter_lines() if ln][-1] == "data: [DONE]"
        assert client.post("/v1/completions", json={"model": "q4_0", "prompt": [1, 10**6]}).status_code == 400
        assert client.post("/v1/completions", json={"model": "other", "prompt": "x"}).status_code == 404
        assert client.get("/metrics").status_code == 200


def server_state(app: Any) -> dict[str, int]:
    from mertools.runtime.model import KVCache

    sched = app.state.scheduler
    deadline = time.monotonic() + 30
    while sched.n_running or sched.n_waiting:
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.01)
    settle(sched.engine)
    return retained((sched, app.state.metrics), skip=(KVCache,))


def test_server_state_is_the_same_after_n_and_3n_requests(q4: Path) -> None:
    from starlette.testclient import TestClient

    from mertools.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(str(q4), cache_mb=1))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the engine did not load"
            time.sleep(0.05)
        serve_rounds(client, ROUNDS)
        first = server_state(app)
        serve_rounds(client, 2 * ROUNDS)
        third = server_state(app)
        served = sum(s.value for f in app.state.metrics.registry.collect() for s in f.samples
                     if s.name == "mertools_requests_total")
    assert served >= 3 * ROUNDS * 5
    assert sum(third.values()) == sum(first.values()), growth(first, third)
