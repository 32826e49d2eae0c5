"""Memory bounds (not timings): the cache never exceeds its byte budget, and `mertools run` on a
checkpoint several times larger than its budget stays within budget + dense weights + overhead."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.layout import Layout
from mertools.runtime.engine import Engine
from mertools.runtime.hooks import RoutingOverride
from mertools.runtime.memory import peak_rss_bytes, resident_bytes
from mertools.runtime.sizing import MARGIN

# Python, numpy, numba and LLVM, the compiled kernels, the tokenizer, KV cache and activations: the margin the engine
# leaves beside its cache when no budget is given, so these tests hold the default sizing to it. Measured: README.
OVERHEAD = MARGIN
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~0.9 GB of experts (16 layers x 8 experts x 7 MB), small dense weights."""
    from fixtures.tiny_mixtral import synth_mixtral_gguf

    work = tmp_path_factory.mktemp("big")
    gguf = synth_mixtral_gguf(work / "big.gguf", 16, seed=3, d_model=1024, d_ff=4096, n_expert=8, n_head=8, n_kv=2,
                              vocab=1024, n_ctx=512)
    out = convert(gguf, work / "layout", ConvertOptions(progress=False)).out
    gguf.unlink()
    return out


def _diverse(layout: Path, seed: int = 0) -> RoutingOverride:
    """Random routing for Engine.open: a random-weight checkpoint routes almost every token alike."""
    rng = np.random.default_rng(seed)
    cfg = Layout.open(layout).manifest.config
    table = {}

    def route(layer: int, pos: np.ndarray) -> np.ndarray:
        return np.array([table.setdefault((int(p), layer), rng.choice(cfg.n_experts, cfg.n_experts_used, replace=False))
                         for p in pos])

    return route


def test_cache_never_exceeds_its_budget(big: Path) -> None:
    m = Layout.open(big).manifest
    slot = max(e.nbytes for e in m.experts)
    budget = 5 * slot
    with Engine.open(big, cache_mb=budget / 2**20, prefetch="lookahead", routing_override=_diverse(big)) as eng:
        assert eng.cache.n_slots * eng.store.slot_bytes <= budget
        # the only expert memory, mapped once: address space for the slots a resize could add, pages for n_slots
        assert len(eng.store.arena) == eng.cache.capacity * slot
        seen = 0
        original = eng.store.load

        def watched(key: tuple[int, int], s: int, cancel: threading.Event | None) -> None:
            nonlocal seen
            with eng.cache.lock:
                seen = max(seen, len(eng.cache.entries))
            original(key, s, cancel)

        eng.cache.loader = watched
        ids = [1, 2, 3]
        eng.forward(ids)
        for t in range(10):
            eng.forward([4 + t])
        assert seen <= eng.cache.n_slots
        assert eng.stats()["bytes_read"] > 3 * budget  # it really streamed
        arena = eng.store.arena_bytes  # in memory: the slots in use (a transparent huge page may reach past them)
        assert resident_bytes(arena.ctypes.data, arena.nbytes) <= eng.cache.n_slots * slot + (2 << 20)


def test_run_rss_stays_within_budget_plus_dense_plus_overhead(big: Path, tmp_path: Path) -> None:
    m = Layout.open(big).manifest
    expert_bytes = sum(e.nbytes for e in m.experts)
    dense = sum(t.nbytes for t in m.dense.values())
    budget_mb = 64
    assert expert_bytes > 8 * budget_mb * 2**20  # several times larger than the budget
    js = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "mertools.cli", "run", str(big), "-p", "hello", "-n", "12", "--cache-mb", str(budget_mb),
           "--json", str(js)]
    # the first run on a machine compiles the numba kernels (LLVM takes several hundred MB while it
    # does, once; the result is cached): measure the steady state, as a user's every later run
    for _ in range(2):
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr
    stats = json.loads(js.read_text())
    assert stats["cache_mb"] <= budget_mb
    limit = budget_mb * 2**20 + dense + OVERHEAD
    assert stats["peak_rss_mb"] * 2**20 <= limit, (stats["peak_rss_mb"], limit / 2**20)
    assert stats["expert_misses"] > 0


def test_default_budget_is_what_is_available_less_dense_kv_and_the_margin(big: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cache_mb the cache takes whole slots of what is left after the dense weights, the KV cache and MARGIN
    (the overhead the RSS tests above hold a run to), never fewer than one layer's choices."""
    import mertools.runtime.engine as engine_mod
    from mertools.runtime.batch import kv_bytes_per_token

    m = Layout.open(big).manifest
    slot = max(e.nbytes for e in m.experts)
    dense = sum(t.nbytes for t in m.dense.values())
    kv = 64 * kv_bytes_per_token(m.config, "f16")
    for room, want in [(5 * slot + slot // 2, 5), (5 * slot - 1, 4), (0, m.config.n_experts_used)]:
        monkeypatch.setattr(engine_mod, "available_bytes", lambda r=room: dense + kv + MARGIN + r)
        with Engine.open(big, context=64, io="direct", prefetch="none") as eng:
            assert eng.cache.n_slots == want, (room, eng.cache.n_slots)


def test_engine_rss_does_not_grow_with_tokens(big: Path) -> None:
    m = Layout.open(big).manifest
    slot = max(e.nbytes for e in m.experts)
    with Engine.open(big, cache_mb=4 * slot / 2**20, routing_override=_diverse(big, seed=1)) as eng:
        eng.forward([1, 2])
        for t in range(8):
            eng.forward([3 + t])
        before = peak_rss_bytes()
        for t in range(24):
            eng.forward([20 + t])
        # 24 more tokens with all-new expert choices: no new memory beyond the KV cache's growth
        assert peak_rss_bytes() - before < 32 << 20


@pytest.mark.slow
def test_long_context_rss_counts_the_kv_cache(tmp_path: Path) -> None:
    """A ~4,000-token prompt on a small model whose KV cache is 16 KiB per token (8 layers x 4 kv heads x 128,
    keys and values, f16): the KV cache is allocated once for prompt + output (no doubling), reported, and RSS
    stays within cache budget + dense + KV + the stated overhead."""
    from fixtures.synth import synth_mixtral_gguf

    gguf = synth_mixtral_gguf(tmp_path / "long.gguf", 8, seed=5, d_model=512, d_ff=512, n_expert=8, n_head=4, n_kv=4,
                              vocab=1024, n_ctx=8192)
    layout = convert(gguf, tmp_path / "layout", ConvertOptions(progress=False)).out
    m = Layout.open(layout).manifest
    dense = sum(t.nbytes for t in m.dense.values())
    budget_mb = 8
    js = tmp_path / "run.json"
    words = [f"w{i % 97} x{i % 13}" for i in range(900)]
    # the steady state, as in test_run_rss_stays_within_budget_plus_dense_plus_overhead: a first run compiles the
    # kernels, on a third of the prompt (chunks of PREFILL_CHUNK and a shorter one, as the whole prompt's)
    for prompt in (" ".join(words[:300]), " ".join(words)):
        res = subprocess.run([sys.executable, "-m", "mertools.cli", "run", str(layout), "-p", prompt, "-n", "4",
                              "--cache-mb", str(budget_mb), "--json", str(js)],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr
    stats = json.loads(js.read_text())
    per = 8 * 4 * 128 * 2 * 2
    assert stats["kv_dtype"] == "f16" and stats["kv_bytes_per_token"] == per and stats["prompt_tokens"] > 3000
    kv = (stats["prompt_tokens"] + 4) * per
    assert stats["kv_mb"] * 2**20 == kv  # exactly the context asked for
    assert "KV cache    f16, 16.0 KiB per token of context" in res.stderr
    limit = budget_mb * 2**20 + dense + kv + OVERHEAD
    assert stats["peak_rss_mb"] * 2**20 <= limit, (stats["peak_rss_mb"], limit / 2**20)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limit_inside_a_container_without_its_own_cgroup_namespace(tmp_path: Path, version: str) -> None:
    """/proc/self/cgroup names the host's path of the group; inside a container without a cgroup namespace of its
    own that path does not exist, and the container's group is mounted at the root: its limit is the one to use."""
    from mertools.runtime.memory import _cgroup_room

    proc, root = tmp_path / "cgroup", tmp_path / "sys"
    mount = root / "memory" if version == "v1" else root
    limit, usage = ("memory.limit_in_bytes", "memory.usage_in_bytes") if version == "v1" else ("memory.max", "memory.current")
    proc.write_text("4:memory:/machine/libpod-abc\n" if version == "v1" else "0::/machine/libpod-abc\n")
    mount.mkdir(parents=True)
    (mount / limit).write_text(str(1 << 30))
    (mount / usage).write_text(str(100 << 20))
    assert _cgroup_room(proc, root) == (1 << 30) - (100 << 20)
    own = mount / "machine" / "libpod-abc"  # where the group is seen at its own path, that one counts
    own.mkdir(parents=True)
    (own / limit).write_text(str(2 << 30))
    (own / usage).write_text("0")
    assert _cgroup_room(proc, root) == 2 << 30
    (own / limit).write_text("max" if version == "v2" else str(1 << 62))  # no limit there: none at all
    assert _cgroup_room(proc, root) is None
