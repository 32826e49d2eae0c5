"""The background fill: a cache with a slot for every expert (a model held in RAM) reads the ones not used yet.

A cold cache reads each expert at its first use, and a model with many experts keeps meeting first uses for
hundreds of tokens (Qwen3-30B-A3B's shape: ~0.9 a token after 400 tokens, 7.3 tok/s against 9.3-9.9 with every
expert resident, on a 2-core host). llama.cpp populates its mapping of the whole file before the first token; this
reads the experts on one thread at the lowest priority, so it reads when the compute leaves a core idle: a server
between requests (`serve` fills), or the process before its first prompt. While a 2-core machine decodes, the thread
rarely runs (~10 experts a second) and costs the decode nothing measurable; at normal priority it filled Qwen3's 6,144
experts in 45 s but halved the decode meanwhile (its packing and hashing preempt a thread of numba's parallel regions,
whose barriers then wait): docs/BENCHMARKS.md "The background fill". Alone it reads the 16.3 GB in ~27 s. No I/O of
its own and no numba: the cache's injected loader reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from .cache import ExpertCache, Key


class BackgroundFill:
    """Loads `order`'s experts (default: every layer's expert 0, then every layer's expert 1, ...) one at a time into
    free slots of `cache`, skipping those held, until every key is done, no slot is free (it never evicts) or `stop`.
    One load at a time: demand loads and prefetches keep the cache's executor and share the disk with one fill read.
    `low_priority`: called first on the thread (the engine lowers its niceness: it runs when compute leaves a core)."""

    def __init__(self, cache: ExpertCache, order: Iterable[Key] | None = None,
                 low_priority: Callable[[], None] | None = None) -> None:
        self.cache = cache
        self.keys = list(order) if order is not None else [
            (layer, expert) for expert in range(cache.n_experts) for layer in range(cache.n_layers)]
        self._low_priority = low_priority
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mertools-fill", daemon=True)
        self.loaded = 0  # loads this fill ran to the end (failed ones included: the cache dropped those)

    def start(self) -> BackgroundFill:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        if self._low_priority is not None:
            self._low_priority()
        for key in self.keys:
            if self._stop.is_set():
                return
            slot = self.cache.claim_free(key)
            if slot is None:  # the budget is full: the policy's evictions decide from here
                return
            if slot >= 0:
                self.cache.load_claimed(key, slot)
                self.loaded += 1

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the fill to end by itself (every key done, or no slot free); whether it has."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self.running

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the load in progress (before the loader's files and slots close); waits for it."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
