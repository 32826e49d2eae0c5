"""Byte-budgeted expert cache: a fixed set of slots, each big enough for one expert file.

No I/O and no numba here: the loader is injected (`loader(key, slot)` fills slot `slot` with expert
`key` and may raise), runs on an executor, and tests drive the cache with a fake one. Slots are
allocated once by the store, so the budget can never be exceeded and nothing is allocated per token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, fields

import numpy as np

from .stats import LatencyHistogram

Key = tuple[int, int]  # (layer, expert)
# loader(key, slot, cancel): fill `slot` with expert `key`; `cancel` (set when a speculative load is
# proved unneeded) may be honoured by raising LoadCancelled, or ignored
Loader = Callable[[Key, int, "threading.Event | None"], None]
POLICIES = ("lfd", "lru")


class LoadCancelled(Exception):
    """A loader stopped a speculative load the routing proved unneeded (not an error)."""


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0  # a prefetched expert that was then looked up
    prefetch_wasted: int = 0  # evicted (or never used) without a lookup
    prefetch_cancelled: int = 0  # still loading when its layer routed elsewhere, and stopped early
    prefetch_ahead: int = 0  # of prefetch_issued, guesses beyond the next layer read while the disk was idle
    filled: int = 0  # loads the background fill started (`claim_free`, fill.py): experts read before any lookup wanted them
    wait_seconds: float = 0.0  # time lookups spent blocked on loads
    load_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # loads that completed

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def plus(self, other: CacheStats) -> CacheStats:
        """The counts of two caches together (the experts' and the stand-ins'); latencies are this one's."""
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "load_latency"}
        return CacheStats(**counts, load_latency=self.load_latency)


@dataclass
class _Entry:
    key: Key
    slot: int
    loading: bool = True  # until the loader has filled the slot
    pins: int = 0
    prefetched: bool = False  # loaded by a prefetch and not yet looked up
    cancel: threading.Event | None = None  # speculative loads only
    cancelled: bool = False  # called off: a lookup must wait for it to go and load afresh


class ExpertCache:
    """`n_slots` resident experts at most. Policy "lfd" (default) approximates Belady for the cyclic
    layer-by-layer access of MoE decoding: keep the expert with the highest estimated chance of use
    per layer of distance until its layer comes round again; "lru" is the plain baseline."""

    def __init__(self, n_slots: int, n_layers: int, n_experts: int, loader: Loader, executor: Executor,
                 policy: str = "lfd", capacity: int | None = None) -> None:
        if n_slots < 1:
            raise ValueError(f"cache needs at least one slot, got {n_slots}")
        # slots the loader can fill (the store's arena): `resize` moves n_slots within [1, capacity]
        capacity = n_slots if capacity is None else capacity
        if capacity < n_slots:
            raise ValueError(f"capacity {capacity} is below the {n_slots} slots asked for")
        self.capacity = capacity
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.n_slots, self.n_layers, self.n_experts = n_slots, n_layers, n_experts
        self.loader, self.executor, self.policy = loader, executor, policy
        self.entries: dict[Key, _Entry] = {}
        self.free = list(range(n_slots - 1, -1, -1))
        self.lock = threading.Condition()
        self.stats = CacheStats()
        self.failed: dict[Key, BaseException] = {}
        self.speculative: set[Key] = set()  # prefetches still loading: the only candidates to call off
        self.in_flight = 0  # loads registered and not yet ended (queued or reading): 0 when the disk is idle for us
        self.clock = 0
        self.current_layer = 0
        # for the "lfd" policy: decayed per-(layer, expert) usage frequency, each layer's last choice,
        # how often a just-used expert is chosen again at the next visit, and experts chosen per visit
        self.freq = np.zeros((n_layers, n_experts))
        self.totals = np.zeros(n_layers)  # each row of freq summed left to right, kept as the rows change
        self.last_chosen = np.zeros((n_layers, n_experts), bool)
        self.repeat_hits = np.zeros(n_layers)
        self.repeat_total = np.zeros(n_layers)
        self.k_seen = np.ones(n_layers)
        self.learns = n_slots < n_layers * n_experts  # with a slot for every expert no victim is ever chosen
        # each slot's (layer, expert) and the clock at its last use (LRU's order, lfd's tie-break), as arrays so a
        # victim search reads them for every candidate at once
        self.slot_layer = np.zeros(capacity, np.int64)
        self.slot_expert = np.zeros(capacity, np.int64)
        self.slot_last = np.zeros(capacity, np.int64)
        # each expert's slot while it is resident (loaded, not loading), else -1; kept as entries change, for the
        # compiled decode step (runtime/fused.py), which looks its experts up in it
        self.slot_of = np.full((n_layers, n_experts), -1, np.int64)
        # lookups and hits of each expert since the start (fixed size): where the traffic goes (`mertools top`'s map)
        self.lookups_by = np.zeros((n_layers, n_experts), np.int64)
        self.hits_by = np.zeros((n_layers, n_experts), np.int64)
        # a subclass that redefines `_score` (benchmarks/routing.py's oracle) is searched entry by entry with it
        self._scalar = type(self)._score is not ExpertCache._score

    # ------------------------------------------------------------------ policy
    def _score(self, e: _Entry) -> float:
        """Higher = more worth keeping. "lfd" keeps the experts with the highest chance of use per layer
        step held (`_value`); "lru" the most recently used."""
        if self.policy == "lru":
            return float(self.slot_last[e.slot])
        return self._value(e.key)

    def _value(self, key: Key, at_least: float = 0.0) -> float:
        """"lfd"'s worth of holding `key`: p / distance, where its layer comes round in `distance` steps and is then
        used with probability p, the learned repeat rate if the expert was chosen at its layer's last visit
        (routing is sticky across tokens), else its share of the layer's choices. Its hit rates beside
        LRU and Belady's optimum on recorded routing: benchmarks/bench_beyond_ram.py, section 4."""
        layer, expert = key
        distance = (layer - self.current_layer) % self.n_layers or self.n_layers
        share = (float(self.freq[layer, expert]) + 0.5) / (float(self.totals[layer]) + 0.5 * self.n_experts)
        p = min(1.0, share * self.k_seen[layer])
        if self.last_chosen[layer, expert]:
            # learned repeat rate of the layer, beyond what the expert's share alone predicts
            r = (self.repeat_hits[layer] + 1.0) / (self.repeat_total[layer] + 2.0)
            p = max(p, r)
        return max(p, at_least) / distance

    def _victim(self, protect: set[Key]) -> _Entry | None:
        candidates = [e for e in self.entries.values() if e.pins == 0 and not e.loading and e.key not in protect]
        if not candidates:
            return None
        if self._scalar:
            return min(candidates, key=lambda e: (self._score(e), self.slot_last[e.slot]))
        # `_score` for every candidate at once (the same double arithmetic), then the first lowest (score, last use),
        # as min() over the entries would pick: thousands of candidates per search with many small experts
        slots = np.fromiter((e.slot for e in candidates), np.int64, len(candidates))
        last = self.slot_last[slots]
        if self.policy == "lru":
            return candidates[int(np.argmin(last))]
        layer, expert = self.slot_layer[slots], self.slot_expert[slots]
        distance = (layer - self.current_layer) % self.n_layers
        distance[distance == 0] = self.n_layers
        share = (self.freq[layer, expert] + 0.5) / (self.totals[layer] + 0.5 * self.n_experts)
        p = np.minimum(1.0, share * self.k_seen[layer])
        repeat = (self.repeat_hits + 1.0) / (self.repeat_total + 2.0)
        p = np.where(self.last_chosen[layer, expert], np.maximum(p, repeat[layer]), p)
        return candidates[int(np.lexsort((last, p / distance))[0])]

    def _take_slot(self, protect: set[Key]) -> int | None:
        if self.free:
            return self.free.pop()
        victim = self._victim(protect)
        if victim is None:
            return None
        self._evict(victim)
        return victim.slot

    def _evict(self, e: _Entry) -> None:
        """Under the lock: forget a resident, unpinned entry."""
        del self.entries[e.key]
        self.slot_of[e.key] = -1
        self.stats.evictions += 1
        if e.prefetched:
            self.stats.prefetch_wasted += 1

    def resize(self, n_slots: int, timeout: float = 30.0) -> list[int]:
        """Use `n_slots` slots from now on (1..capacity). Growing frees slots n_slots..; shrinking evicts the entries
        of the slots given up, after calling off their prefetches and waiting for loads and pins on them to end (a
        caller between forward passes holds no pins). Returns the slots given up, whose memory the store may
        release. A load that completes into a given-up slot is impossible: no slot >= n_slots is handed out again."""
        if not 1 <= n_slots <= self.capacity:
            raise ValueError(f"the cache can hold 1 to {self.capacity} slots, not {n_slots}")
        with self.lock:
            old, self.n_slots = self.n_slots, n_slots
            self.learns = n_slots < self.n_layers * self.n_experts
            if n_slots >= old:
                self.free[:0] = range(n_slots - 1, old - 1, -1)  # popped last: the old free slots go first
                self.lock.notify_all()
                return []
            self.free = [s for s in self.free if s < n_slots]
            deadline = time.monotonic() + timeout
            while True:
                gone = [e for e in self.entries.values() if e.slot >= n_slots]
                for e in gone:
                    if e.loading and e.cancel is not None:
                        e.cancel.set()
                        e.cancelled = True
                busy = [e for e in gone if e.loading or e.pins]
                if not busy:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(busy)} experts still loading or in use in the slots given up")
                self.lock.wait(timeout=0.05)
            for e in gone:
                self._evict(e)
            return list(range(n_slots, old))

    # ------------------------------------------------------------------ loading
    def _start_load(self, key: Key, slot: int, prefetched: bool) -> _Entry:
        entry = self._register(key, slot, prefetched)  # before submitting: a loader that completes at once finds it
        self.executor.submit(self._run_loader, key, slot, entry.cancel)
        return entry

    def _register(self, key: Key, slot: int, prefetched: bool) -> _Entry:
        """Under the lock: `key` is loading into `slot`."""
        self.slot_layer[slot], self.slot_expert[slot], self.slot_last[slot] = key[0], key[1], self.clock
        entry = _Entry(key, slot, prefetched=prefetched,
                       cancel=threading.Event() if prefetched else None)
        self.entries[key] = entry
        self.slot_of[key] = -1
        if prefetched:
            self.speculative.add(key)
        self.stats.loads += 1
        self.in_flight += 1
        return entry

    def claim_free(self, key: Key) -> int | None:
        """A free slot, now loading `key`, for a caller that runs the load itself (`load_claimed`: the background fill,
        fill.py); -1 when `key` is held already, None when no slot is free (this never evicts)."""
        with self.lock:
            if key in self.entries:
                return -1
            if not self.free:
                return None
            slot = self.free.pop()
            self._register(key, slot, prefetched=False)
            self.stats.filled += 1
            return slot

    def load_claimed(self, key: Key, slot: int) -> None:
        """Run the load `claim_free` registered, on the calling thread; a lookup meanwhile waits for it as for a
        prefetch, and a failed load is dropped as any load's."""
        self._run_loader(key, slot, None)

    def _run_loader(self, key: Key, slot: int, cancel: threading.Event | None) -> None:
        try:
            self._load(key, slot, cancel)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _load(self, key: Key, slot: int, cancel: threading.Event | None) -> None:
        t0 = time.perf_counter()
        try:
            self.loader(key, slot, cancel)
        except LoadCancelled:
            with self.lock:
                self.stats.prefetch_cancelled += 1  # counted only if the loader really stopped early
                self._drop(key, slot)
            return
        except BaseException as exc:  # the store already retried
            with self.lock:
                entry = self.entries.get(key)
                # kept only for a lookup holding the entry, which pops it: nobody else would, and an
                # unwanted prefetch's failure is no error (a later lookup loads afresh)
                if entry is not None and entry.slot == slot and entry.pins > 0:
                    self.failed[key] = exc
                self._drop(key, slot)
            return
        self.stats.load_latency.observe(time.perf_counter() - t0)
        with self.lock:
            self.speculative.discard(key)
            entry = self.entries.get(key)
            if entry is not None and entry.slot == slot:
                entry.loading = entry.cancelled = False  # a cancel that came too late: it is all there
                self.slot_of[key] = slot
            self.lock.notify_all()

    def _drop(self, key: Key, slot: int) -> None:
        """Under the lock: a load that did not complete gives its slot back and wakes the waiters."""
        self.speculative.discard(key)
        entry = self.entries.get(key)
        if entry is not None and entry.slot == slot:
            del self.entries[key]
            if slot < self.n_slots:  # not a slot `resize` gave up
                self.free.append(slot)
            self.slot_of[key] = -1
        self.lock.notify_all()

    def note_layer(self, layer: int) -> None:
        """The forward pass has reached `layer`: distances in the policy are measured from here."""
        with self.lock:
            self.current_layer = layer

    def record_routing(self, layer: int, experts: Iterable[int], decay: float = 0.995) -> None:
        """The policy's usage estimates learn a layer's choice; not kept by a cache that holds every expert, which
        never looks for a victim (its estimates would never be read)."""
        if not self.learns:
            return
        chosen = set(int(e) for e in experts)
        with self.lock:
            row = self.freq[layer]
            row *= decay
            for e in chosen:
                row[e] += 1.0
            self.totals[layer] = np.cumsum(row)[-1]  # summed left to right, as sum(row) would
            last, now = self.last_chosen[layer], list(chosen)
            if last.any():
                self.repeat_hits[layer] = self.repeat_hits[layer] * decay + int(last[now].sum())
                self.repeat_total[layer] = self.repeat_total[layer] * decay + int(last.sum())
            last[:] = False
            last[now] = True
            self.k_seen[layer] = max(1.0, float(len(chosen)))

    def seed(self, freq: list[list[float]], k: list[float]) -> None:
        """Start the "lfd" policy's usage estimates from a routing history (history.py) instead of nothing:
        freq (n_layers, n_experts) as decayed choice counts, k per layer the experts chosen per visit; routing
        that comes in decays them like any other count."""
        with self.lock:
            for layer in range(self.n_layers):
                self.freq[layer] = freq[layer]
                self.totals[layer] = np.cumsum(self.freq[layer])[-1]
                self.k_seen[layer] = max(1.0, float(k[layer]))

    def prefetch(self, keys: Iterable[Key], protect: Iterable[Key] = ()) -> int:
        """Start loading the keys not resident, never evicting pinned, loading or protected entries.
        Returns how many loads were started."""
        started = 0
        with self.lock:
            keep = set(protect) | set(keys)
            for key in keys:
                if key in self.entries:
                    continue
                slot = self._take_slot(keep)
                if slot is None:
                    break
                self._start_load(key, slot, prefetched=True)
                self.stats.prefetch_issued += 1
                started += 1
        return started

    def busy(self) -> bool:
        """Whether a load is queued or reading (a lock-free peek, for callers deciding whether to guess further)."""
        return self.in_flight > 0

    def holds(self, keys: Iterable[Key]) -> bool:
        """Whether every key is resident or loading (a lock-free peek)."""
        return all(k in self.entries for k in keys)

    def prefetch_idle(self, keys: Iterable[Key], chance: float, protect: Iterable[Key] = ()) -> int:
        """Start reading the first of `keys` not held, only while no load is in flight, so a weaker guess (a layer
        further ahead) never takes bandwidth from a read that is needed; one read per call. It takes a free slot, or,
        under "lfd", the slot of an expert the policy values less than the guess: `_value` with p at least `chance`,
        the guess's chance of being used. Returns 1 if a read was started."""
        with self.lock:
            if self.in_flight:
                return 0
            keys = list(keys)
            keep = set(protect) | set(keys)
            for key in keys:
                if key in self.entries:
                    continue
                if self.free:
                    slot = self.free.pop()
                else:
                    victim = self._victim(keep)
                    if victim is None or (self.policy == "lfd" and self._score(victim) >= self._value(key, chance)):
                        return 0
                    self._evict(victim)
                    slot = victim.slot
                self._start_load(key, slot, prefetched=True)
                self.stats.prefetch_issued += 1
                self.stats.prefetch_ahead += 1
                return 1
            return 0

    def acquire(self, keys: list[Key]) -> Iterator[tuple[Key, int]]:
        """Look the keys up now (counting hits and misses, starting loads for misses as free slots
        allow) and return an iterator of (key, slot), pinned, in the order they become resident; the
        caller calls `release(key)` when done with each. With fewer slots than keys, later keys are
        loaded as earlier ones are released. A failed load raises from the iterator (the loader has
        already retried)."""
        pending = list(dict.fromkeys(keys))
        pinned: set[Key] = set()
        with self.lock:
            self.clock += 1
            self._cancel_unneeded(pending)
            for key in pending:
                self.stats.lookups += 1
                self.lookups_by[key] += 1
                e = self.entries.get(key)
                if e is None or e.cancelled:
                    self.stats.misses += 1
                    self.failed.pop(key, None)  # a stale failed prefetch: try again
                    continue
                # resident, or a prefetch still in flight: either way the read was issued early
                self.stats.hits += 1
                self.hits_by[key] += 1
                if e.prefetched:
                    self.stats.prefetch_used += 1
                    e.prefetched = False
                e.pins += 1  # pinned so it cannot be evicted under us
                pinned.add(key)
            for key in pending:  # start the misses' loads now, before any speculative prefetch
                if key not in self.entries:
                    slot = self._take_slot(set(pending))
                    if slot is None:
                        break
                    self._start_load(key, slot, prefetched=False).pins += 1
                    pinned.add(key)
        return self._iterate(pending, pinned)

    def _cancel_unneeded(self, keys: list[Key]) -> None:
        """Under the lock: the routing of these keys' layer is known, so speculative loads for that
        layer still in flight and not among them are called off (their slots come back when the
        loader stops). Finished ones stay: they may serve a later token."""
        layers = {k[0] for k in keys}
        want = set(keys)
        for key in self.speculative:
            e = self.entries.get(key)
            if e is not None and e.prefetched and e.cancel is not None and key[0] in layers and key not in want:
                e.cancel.set()
                e.cancelled = True

    def _iterate(self, pending: list[Key], pinned: set[Key]) -> Iterator[tuple[Key, int]]:
        try:
            while pending:
                with self.lock:
                    ready = self._next_ready(pending, pinned)
                    if ready is None:
                        t0 = time.perf_counter()
                        self.lock.wait(timeout=0.5)
                        self.stats.wait_seconds += time.perf_counter() - t0
                        continue
                    pending.remove(ready)
                    e = self.entries[ready]
                    self.slot_last[e.slot] = self.clock
                    slot = e.slot
                pinned.discard(ready)  # the caller owns this pin now
                yield ready, slot
        finally:
            with self.lock:  # unpin what the caller never received (an error or an early exit)
                for key in pinned:
                    e = self.entries.get(key)
                    if e is not None and e.pins > 0:
                        e.pins -= 1
                self.lock.notify_all()

    def _next_ready(self, pending: list[Key], pinned: set[Key]) -> Key | None:
        """Under the lock: start what can be started, raise a failed load, return a resident key."""
        for key in pending:
            if key in self.failed:
                pinned.discard(key)
                raise self.failed.pop(key)
            e = self.entries.get(key)
            if e is None:
                slot = self._take_slot(set(pending))
                if slot is None:
                    continue
                e = self._start_load(key, slot, prefetched=False)
                e.pins += 1
                pinned.add(key)
            elif key not in pinned:  # appeared through a prefetch after our first pass
                e.pins += 1
                pinned.add(key)
            if not e.loading:
                return key
        if not any(key in self.entries for key in pending) and not self.free:
            raise RuntimeError(f"expert cache of {self.n_slots} slots is full of pinned experts")
        return None

    def release(self, key: Key) -> None:
        with self.lock:
            e = self.entries.get(key)
            if e is not None and e.pins > 0:
                e.pins -= 1
            self.lock.notify_all()

    def resident(self) -> set[Key]:
        with self.lock:
            return {k for k, e in self.entries.items() if not e.loading}

    def all_resident(self, keys: list[Key]) -> bool:
        """Whether every key is loaded now (not loading, not called off); a pure query."""
        with self.lock:
            return all((e := self.entries.get(k)) is not None and not e.loading and not e.cancelled for k in keys)

    def touch(self, chosen: np.ndarray, first: int = 0) -> None:
        """What `acquire` of each layer's chosen experts (chosen (layers, m), all resident, for layers first, first + 1,
        ...) counts, layer by layer, without pinning them (a step that needs no slot can evict nothing): a clock tick
        per layer, a lookup and a hit per distinct expert, a prefetch used, the last use; the policy's distances from
        the last layer."""
        with self.lock:
            for layer, row in enumerate(chosen.tolist(), first):
                self.clock += 1
                for expert in dict.fromkeys(row):
                    e = self.entries[(layer, expert)]
                    self.stats.lookups += 1
                    self.stats.hits += 1
                    self.lookups_by[layer, expert] += 1
                    self.hits_by[layer, expert] += 1
                    if e.prefetched:
                        self.stats.prefetch_used += 1
                        e.prefetched = False
                    self.slot_last[e.slot] = self.clock
            self.current_layer = first + len(chosen) - 1

    def states(self) -> np.ndarray:
        """Each expert's state now, (n_layers, n_experts) int8: 0 not held, 1 resident, 2 loading."""
        out = np.zeros((self.n_layers, self.n_experts), np.int8)
        with self.lock:
            for (layer, expert), e in self.entries.items():
                out[layer, expert] = 2 if e.loading else 1
        return out

    def held(self, layer: int) -> list[int]:
        """The experts of `layer` a lookup now would count as hits (resident, or loading and not called off),
        sorted; a pure query: no state, clock or statistics change (for cache-aware routing)."""
        with self.lock:
            return sorted(k[1] for k, e in self.entries.items() if k[0] == layer and not e.cancelled)
