"""The background fill (runtime/fill.py): a cache with a slot for every expert reads them all while the engine runs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mertools.layout import Layout
from mertools.runtime.cache import ExpertCache
from mertools.runtime.engine import Engine
from mertools.runtime.fill import BackgroundFill

PROMPT = [1, 45, 300, 22, 17, 99, 250, 3]


class SlowLoader:
    """The cache's injected loader: records each key into its slot after `delay`; fails the keys in `fail`."""

    def __init__(self, n_slots: int, delay: float = 0.0, fail: frozenset = frozenset()) -> None:
        self.slots: list[tuple[int, int] | None] = [None] * n_slots
        self.delay, self.fail, self.calls = delay, fail, []
        self.lock = threading.Lock()

    def __call__(self, key: tuple[int, int], slot: int, cancel: threading.Event | None = None) -> None:
        with self.lock:
            self.calls.append(key)
        time.sleep(self.delay)
        if key in self.fail:
            raise OSError(5, f"injected failure for {key}")
        self.slots[slot] = key


def _cache(n_slots: int, n_layers: int = 3, n_experts: int = 4, **kw) -> tuple[ExpertCache, SlowLoader]:
    loader = SlowLoader(n_slots, **kw)
    return ExpertCache(n_slots, n_layers, n_experts, loader, ThreadPoolExecutor(2)), loader


def _wait(fill: BackgroundFill) -> None:
    assert fill.wait(timeout=30)


def test_the_fill_loads_every_expert_once_in_its_order_into_their_slots() -> None:
    cache, loader = _cache(12)
    for _ in cache.acquire([(1, 2)]):  # one held already: the fill skips it
        cache.release((1, 2))
    fill = BackgroundFill(cache).start()
    _wait(fill)
    order = [(layer, expert) for expert in range(4) for layer in range(3)]
    assert loader.calls == [(1, 2)] + [k for k in order if k != (1, 2)]  # the lookup's, then the fill's in order
    assert fill.loaded == cache.stats.filled == 11 and cache.stats.misses == 1
    assert cache.resident() == set(order)
    assert all(loader.slots[cache.slot_of[key]] == key for key in order)  # each slot holds its expert
    assert cache.stats.evictions == 0


def test_the_fill_never_evicts_and_stops_when_the_slots_are_taken() -> None:
    cache, loader = _cache(5)
    fill = BackgroundFill(cache).start()
    _wait(fill)
    assert len(cache.resident()) == 5 and cache.stats.evictions == 0 and fill.loaded == 5
    assert not cache.free  # a lookup from here evicts by the policy
    for _ in cache.acquire([(2, 3)]):
        cache.release((2, 3))
    assert cache.stats.evictions == 1


def test_a_lookup_of_an_expert_the_fill_is_loading_waits_for_that_load() -> None:
    cache, loader = _cache(12, delay=0.2)
    fill = BackgroundFill(cache, order=[(0, 1), (0, 2)]).start()
    time.sleep(0.05)  # the fill is inside (0, 1)'s load
    got = [(key, slot) for key, slot in cache.acquire([(0, 1)])]
    cache.release((0, 1))
    assert loader.slots[got[0][1]] == (0, 1)
    assert loader.calls.count((0, 1)) == 1 and cache.stats.hits == 1 and cache.stats.misses == 0
    fill.stop()
    assert not fill.running


def test_stop_ends_the_fill_after_the_load_in_progress() -> None:
    cache, loader = _cache(12, delay=0.05)
    fill = BackgroundFill(cache).start()
    time.sleep(0.12)
    fill.stop()
    assert not fill.running and 1 <= fill.loaded < 12
    assert not any(e.loading for e in cache.entries.values())  # nothing left half-loaded
    assert len(cache.resident()) == fill.loaded


def test_a_failed_fill_load_frees_its_slot_and_the_fill_goes_on() -> None:
    cache, loader = _cache(12, fail=frozenset({(0, 0)}))
    fill = BackgroundFill(cache).start()
    _wait(fill)
    assert (0, 0) not in cache.resident() and len(cache.resident()) == 11 and len(cache.free) == 1
    with pytest.raises(OSError, match="injected failure"):  # a lookup reads it afresh, and reports the failure
        for _ in cache.acquire([(0, 0)]):
            pass


def _experts(layout: Path) -> int:
    return len(Layout.open(layout).manifest.experts)


@pytest.mark.parametrize("kernels", ["exact", "int8"])
def test_an_engine_that_fills_computes_the_same_logits_and_reads_each_expert_once(tiny_dtypes: dict, kernels: str) -> None:
    layout = tiny_dtypes["q4_0"]
    with Engine.open(layout, kernels=kernels) as eng:
        base = np.concatenate([eng.forward(PROMPT[:5]), *(eng.forward([t]) for t in PROMPT[5:])])
    with Engine.open(layout, kernels=kernels, fill=True) as eng:
        got = np.concatenate([eng.forward(PROMPT[:5]), *(eng.forward([t]) for t in PROMPT[5:])])
        assert eng.filler.wait(timeout=60)
        s = eng.stats()
        n = _experts(layout)
        # each expert read once: by the fill, a lookup or a prefetch
        assert eng.cache.stats.loads == n and s["experts_filled"] + s["expert_misses"] + s["prefetch_issued"] == n
        assert s["bytes_read"] == sum(e.nbytes for e in Layout.open(layout).manifest.experts)
        assert len(eng.cache.resident()) == n
    np.testing.assert_array_equal(got, base)


def test_an_engine_fills_before_any_lookup_and_then_never_misses(tiny_dtypes: dict) -> None:
    layout = tiny_dtypes["q4_k"]
    with Engine.open(layout, fill=True) as eng:
        assert eng.filler.wait(timeout=60)
        eng.forward(PROMPT)
        s = eng.stats()
    assert s["experts_filled"] == _experts(layout) and s["expert_misses"] == 0 and s["hit_rate"] == 1.0


def test_no_fill_when_the_cache_is_smaller_than_the_experts_or_unasked(tiny_dtypes: dict) -> None:
    layout = tiny_dtypes["q4_0"]
    slot_mb = max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20
    with Engine.open(layout, cache_mb=3 * slot_mb, fill=True) as eng:
        assert eng.filler is None
        eng.forward(PROMPT)
        assert eng.stats()["experts_filled"] == 0
    with Engine.open(layout) as eng:
        assert eng.filler is None
