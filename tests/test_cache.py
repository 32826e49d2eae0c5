"""The expert cache and prefetchers, driven by a fake loader: no I/O, no numba."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mertools.runtime.cache import ExpertCache, LoadCancelled
from mertools.runtime.prefetch import LookaheadPrefetcher, MarkovPrefetcher


class FakeLoader:
    """Writes the key into a slot table; can be slowed down or made to fail."""

    def __init__(self, n_slots: int, delay: float = 0.0, fail: set | None = None) -> None:
        self.slots: list[tuple[int, int] | None] = [None] * n_slots
        self.delay, self.fail = delay, fail or set()
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, key: tuple[int, int], slot: int, cancel: threading.Event | None = None) -> None:
        with self.lock:
            self.calls.append(key)
        t_end = time.perf_counter() + self.delay
        while time.perf_counter() < t_end:  # a slow read in small steps, like the store's chunks
            if cancel is not None and cancel.is_set():
                raise LoadCancelled(key)
            time.sleep(min(0.005, self.delay))
        if key in self.fail:
            raise OSError(5, f"injected failure for {key}")
        self.slots[slot] = key


def make(n_slots: int, n_layers: int = 4, n_experts: int = 8, policy: str = "lfd", **kw):  # noqa: ANN201
    loader = FakeLoader(n_slots, **kw)
    pool = ThreadPoolExecutor(4)
    return ExpertCache(n_slots, n_layers, n_experts, loader, pool, policy=policy), loader


def use(cache: ExpertCache, loader: FakeLoader, keys: list) -> None:
    cache.note_layer(keys[0][0])
    for key, slot in cache.acquire(keys):
        assert loader.slots[slot] == key  # the slot really holds this expert while pinned
        cache.release(key)


def test_hits_misses_and_budget() -> None:
    cache, loader = make(3)
    use(cache, loader, [(0, 1), (0, 2)])
    use(cache, loader, [(0, 1), (0, 2)])
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.misses) == (4, 2, 2)
    for layer in range(4):
        use(cache, loader, [(layer, 0), (layer, 5)])
    assert len(cache.entries) <= 3 and cache.stats.evictions > 0


def test_more_keys_than_slots_are_streamed_through() -> None:
    cache, loader = make(2)
    keys = [(1, e) for e in range(8)]
    got = []
    cache.note_layer(1)
    for key, slot in cache.acquire(keys):
        assert loader.slots[slot] == key
        got.append(key)
        cache.release(key)
    assert sorted(got) == keys and len(cache.entries) <= 2


def test_pinned_experts_are_never_evicted() -> None:
    cache, loader = make(2, delay=0.01)
    it = cache.acquire([(0, 0)])
    key, slot = next(it)
    # another reader churns through many experts while (0, 0) is pinned
    for e in range(1, 6):
        use(cache, loader, [(1, e)])
    assert loader.slots[slot] == (0, 0)
    cache.release(key)
    list(it)


def test_failed_load_raises_and_frees_the_slot() -> None:
    cache, loader = make(2, fail={(2, 3)})
    with pytest.raises(OSError, match="injected"):
        use(cache, loader, [(2, 1), (2, 3)])
    assert (2, 3) not in cache.entries
    loader.fail.clear()
    use(cache, loader, [(2, 3)])  # a later attempt loads it again
    assert (2, 3) in cache.resident()


def test_concurrent_requests_for_one_expert_load_it_once() -> None:
    cache, loader = make(4, delay=0.05)
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        use(cache, loader, [(3, 7)])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls.count((3, 7)) == 1


def test_prefetch_counts_used_and_wasted_and_respects_protection() -> None:
    cache, loader = make(3, delay=0.0)
    use(cache, loader, [(0, 0), (0, 1)])
    assert cache.prefetch([(1, 4)], protect=[(0, 0), (0, 1)]) == 1
    time.sleep(0.05)
    use(cache, loader, [(1, 4)])
    assert cache.stats.prefetch_used == 1 and cache.stats.hits == 1
    # a prefetch may not evict protected experts: with all 3 slots protected it starts nothing
    assert cache.prefetch([(2, 2)], protect=[(0, 0), (0, 1), (1, 4)]) == 0
    cache.prefetch([(3, 3)])
    time.sleep(0.05)
    for layer in range(4):
        use(cache, loader, [(layer, 6), (layer, 7)])
    assert cache.stats.prefetch_wasted >= 1


def _routing_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, seed: int) -> list[list[list[int]]]:
    """Skewed, layer-dependent routing (Zipf-like popularity, a different favourite per layer)."""
    rng = np.random.default_rng(seed)
    pops = []
    for layer in range(n_layers):
        p = 1.0 / np.arange(1, n_experts + 1) ** 1.1
        pops.append(np.roll(p / p.sum(), layer * 3))
    return [[list(rng.choice(n_experts, top_k, replace=False, p=pops[la])) for la in range(n_layers)]
            for _ in range(n_tokens)]


def _hit_rate(policy: str, trace: list, n_slots: int, n_layers: int, n_experts: int) -> float:
    cache, loader = make(n_slots, n_layers, n_experts, policy=policy)
    for token in trace:
        for layer, experts in enumerate(token):
            cache.record_routing(layer, experts)
            use(cache, loader, [(layer, e) for e in experts])
    return cache.stats.hit_rate


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_lfd_policy_beats_lru_on_cyclic_layer_access(fraction: float) -> None:
    n_layers, n_experts = 8, 16
    trace = _routing_trace(300, n_layers, n_experts, 2, seed=0)
    slots = int(n_layers * n_experts * fraction)
    lru = _hit_rate("lru", trace, slots, n_layers, n_experts)
    lfd = _hit_rate("lfd", trace, slots, n_layers, n_experts)
    assert lfd > lru, (lfd, lru)


def test_everything_fits_means_only_compulsory_misses() -> None:
    trace = _routing_trace(100, 4, 8, 2, seed=1)
    cache, loader = make(32, 4, 8)
    for token in trace:
        for layer, experts in enumerate(token):
            use(cache, loader, [(layer, e) for e in experts])
    assert cache.stats.misses == len({(la, e) for t in trace for la, es in enumerate(t) for e in es})


def test_lookahead_prefetcher_uses_the_next_router() -> None:
    w = np.zeros((3, 4, 2))  # per layer, (n_experts, d)
    w[1, 2] = [5.0, 0.0]
    w[1, 3] = [4.0, 0.0]

    def router(layer: int, h: np.ndarray) -> np.ndarray:
        z = h @ w[layer].T
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    p = LookaheadPrefetcher(router, 3)
    assert p.guess(0, np.array([[0, 1]]), np.array([[1.0, 0.0]]), 2) == [2, 3]
    assert p.guess(2, np.array([[0, 1]]), np.array([[1.0, 0.0]]), 2) == []  # no layer after the last


def test_lookahead_guesses_ahead_nearest_layer_first_up_to_its_depth() -> None:
    w = np.zeros((5, 4, 2))  # per layer, (n_experts, d): layer l prefers expert l % 4, then (l + 1) % 4
    for layer in range(5):
        w[layer, layer % 4] = [5.0, 0.0]
        w[layer, (layer + 1) % 4] = [4.0, 0.0]

    def router(layer: int, h: np.ndarray) -> np.ndarray:
        z = h @ w[layer].T
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    x = np.array([[1.0, 0.0]])
    assert list(LookaheadPrefetcher(router, 5).guess_ahead(0, x, 2)) == []  # depth 1: the next layer only (guess)
    assert list(LookaheadPrefetcher(router, 5, depth=3).guess_ahead(0, x, 1)) == [(2, [2]), (3, [3])]
    assert list(LookaheadPrefetcher(router, 5, depth=3).guess_ahead(0, x, 2)) == [(2, [2, 3]), (3, [3, 0])]
    assert list(LookaheadPrefetcher(router, 5, depth=9).guess_ahead(2, x, 1)) == [(4, [0])]  # not past the last
    two = np.array([[1.0, 0.0], [0.0, 1.0]])  # the second token's scores all tie: its top choices are 0 and 1
    assert list(LookaheadPrefetcher(router, 5, depth=2).guess_ahead(0, two, 2)) == [(2, [2, 0, 3, 1])]
    with pytest.raises(ValueError, match="depth"):
        LookaheadPrefetcher(router, 5, depth=0)


def test_prefetch_idle_reads_one_guess_only_while_no_load_is_in_flight() -> None:
    cache, loader = make(4, n_layers=8, delay=0.3)
    cache.note_layer(0)
    assert cache.prefetch([(1, 3)]) == 1 and cache.busy()
    assert cache.prefetch_idle([(2, 4), (3, 5)], 0.5) == 0  # the next layer's read is in flight: nothing more
    deadline = time.perf_counter() + 2
    while cache.busy() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not cache.busy()
    assert cache.prefetch_idle([(1, 3), (2, 4), (3, 5)], 0.5) == 1  # (1, 3) is held: the first one not held, alone
    assert set(cache.entries) == {(1, 3), (2, 4)} and cache.busy()
    assert cache.stats.prefetch_issued == 2
    use(cache, loader, [(2, 4)])  # a guess ahead is a prefetch like any: used when its layer routes to it
    assert cache.stats.prefetch_used == 1


def test_prefetch_idle_never_evicts_what_the_policy_values_more() -> None:
    cache, loader = make(2, n_layers=8)
    for layer in (1, 2):  # the same experts chosen at every visit: the policy holds them dear
        for _ in range(5):
            cache.record_routing(layer, [0])
    use(cache, loader, [(1, 0)])
    use(cache, loader, [(2, 0)])
    cache.note_layer(0)  # layers 1 and 2 come next: worth more than a guess four layers ahead
    assert cache.prefetch_idle([(4, 6)], 0.5) == 0 and set(cache.entries) == {(1, 0), (2, 0)}
    cache.note_layer(3)  # layers 1 and 2 have just passed: a guess for the next layer but one replaces one
    assert cache.prefetch_idle([(5, 6)], 0.5) == 1 and (5, 6) in cache.entries


def test_markov_prefetcher_learns_transitions() -> None:
    m = MarkovPrefetcher(3, 4)
    for _ in range(5):
        m.observe(0, np.array([[0, 1]]))
        m.observe(1, np.array([[2, 3]]))
    assert sorted(m.guess(0, np.array([[0, 1]]), np.zeros((1, 2)), 2)) == [2, 3]


def test_speculative_loads_are_called_off_when_their_layer_routes_elsewhere() -> None:
    cache, loader = make(4, delay=0.3)
    cache.note_layer(0)
    assert cache.prefetch([(1, 3), (1, 4)]) == 2
    use(cache, loader, [(1, 5)])  # layer 1 routed to expert 5: the guesses 3 and 4 are wrong
    deadline = time.perf_counter() + 2
    while len(cache.entries) > 1 and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert cache.stats.prefetch_cancelled == 2
    assert set(cache.entries) == {(1, 5)} and len(cache.free) == 3  # their slots came back
    # a guess that was right is kept: prefetch 6, then route to 6
    cache.prefetch([(1, 6)])
    use(cache, loader, [(1, 6)])
    assert cache.stats.prefetch_used == 1 and cache.stats.prefetch_cancelled == 2


def test_a_called_off_load_that_is_then_needed_is_loaded_afresh() -> None:
    cache, loader = make(3, delay=0.2)
    cache.note_layer(0)
    cache.prefetch([(1, 3)])
    use(cache, loader, [(1, 5)])  # calls off (1, 3) ...
    use(cache, loader, [(1, 3)])  # ... which the next token needs at once: correct bytes, not a stale slot
    assert loader.calls.count((1, 3)) == 2 and cache.stats.prefetch_used == 0


@pytest.mark.parametrize("policy", ["lfd", "lru"])
def test_the_vectorised_victim_search_is_the_entry_by_entry_one(policy: str) -> None:
    """The victim search scores every candidate at once from slot-indexed arrays; it must pick what min() over the
    entries with `_score` picks (the first lowest score, then last use), whatever the state: sticky and random
    routing, ties, protected keys, a seeded history."""
    rng = np.random.default_rng(11)
    cache, loader = make(24, n_layers=6, n_experts=16, policy=policy)
    if policy == "lfd":
        cache.seed(rng.uniform(0, 5, (6, 16)).tolist(), [2.0] * 6)
    checked = 0
    for step in range(300):
        layer = step % 6
        sticky = np.flatnonzero(cache.last_chosen[layer]).tolist() or [0, 1, 2]
        chosen = rng.choice(16, 3, replace=False).tolist() if step % 4 else sticky
        cache.record_routing(layer, chosen)
        use(cache, loader, [(layer, e) for e in chosen])
        with cache.lock:
            protect = {(layer, e) for e in chosen[:1]}
            cands = [e for e in cache.entries.values() if e.pins == 0 and not e.loading and e.key not in protect]
            if len(cands) > 1:
                want = min(cands, key=lambda e: (cache._score(e), cache.slot_last[e.slot]))
                assert cache._victim(protect) is want, (step, want.key)
                checked += 1
    assert checked > 250 and cache.stats.evictions > 100
    # exact ties of the score (the same usage, both chosen last time, one layer) split by last use
    cache, loader = make(6, n_layers=2, n_experts=8, policy=policy)
    for a in (0, 2, 4):
        cache.record_routing(0, [a, a + 1])
        use(cache, loader, [(0, a)])  # a enters the cache first but is used again last: a + 1 is the older
        use(cache, loader, [(0, a + 1)])
        use(cache, loader, [(0, a)])
    with cache.lock:
        cands = list(cache.entries.values())
        want = min(cands, key=lambda e: (cache._score(e), cache.slot_last[e.slot]))
        assert cache._victim(set()) is want and want.key == (0, 1)  # (0, 0) has the same score, used later


def test_resize_shrinks_evicting_the_given_up_slots_and_grows_into_the_reserve() -> None:
    loader = FakeLoader(8)
    cache = ExpertCache(6, 4, 8, loader, ThreadPoolExecutor(4), capacity=8)
    for layer in range(3):
        use(cache, loader, [(layer, 0), (layer, 1)])
    assert len(cache.entries) == 6 and not cache.free
    gone = cache.resize(2)
    assert gone == [2, 3, 4, 5] and cache.n_slots == 2
    assert all(e.slot < 2 for e in cache.entries.values()) and len(cache.entries) == 2
    held = {k for k, e in cache.entries.items()}
    assert all(cache.slot_of[k] >= 0 for k in held) and (cache.slot_of >= 0).sum() == 2
    for layer in range(4):  # streaming through 2 slots: never a slot given up
        use(cache, loader, [(layer, 2), (layer, 3)])
        assert all(e.slot < 2 for e in cache.entries.values())
    assert cache.resize(8) == [] and cache.n_slots == 8 and sorted(cache.free) == [2, 3, 4, 5, 6, 7]
    for layer in range(4):
        use(cache, loader, [(layer, 4), (layer, 5)])
    assert len(cache.entries) == 8 and max(e.slot for e in cache.entries.values()) == 7
    with pytest.raises(ValueError, match="1 to 8"):
        cache.resize(9)
    with pytest.raises(ValueError, match="1 to 8"):
        cache.resize(0)


def test_resize_calls_off_prefetches_in_given_up_slots_and_waits_for_them() -> None:
    cache, loader = make(4, delay=0.3)
    cache.note_layer(0)
    assert cache.prefetch([(1, 3), (1, 4), (1, 5), (1, 6)]) == 4  # slots 0..3, all loading
    assert cache.resize(1) == [1, 2, 3]
    assert cache.stats.prefetch_cancelled == 3  # called off (the loader stopped), not read to the end
    assert all(e.slot == 0 for e in cache.entries.values()) and cache.free in ([], [0])
    deadline = time.perf_counter() + 2
    while any(e.loading for e in cache.entries.values()) and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert all(s < 1 for s in cache.free)  # a load that stopped in a given-up slot did not give it back
    use(cache, loader, [(2, 0)])
    assert set(cache.entries) == {(2, 0)}
