"""What callers may plug into a model, given once to `Engine.open` (never patched on afterwards):
a routing trace, a routing override (I/O benchmarks), a prefetcher of their own, approximate
routing settings (approx.py; exact by default), a routing history to add this run's routing to, and
experts computed elsewhere (shards.py: expert shards as Ray actors)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .approx import Approx
from .history import RoutingHistory
from .prefetch import Prefetcher, RouterFn

# (positions (n,), layer, chosen experts (n, k), their weights (n, k))
TraceFn = Callable[[np.ndarray, int, np.ndarray, np.ndarray], None]
# (layer, positions (n,)) -> experts (n, k): replaces the router's choice (the weights stay the
# router's probabilities of those experts). For I/O benchmarks: random-weight checkpoints route
# almost every token to the same experts, which flatters any cache.
RoutingOverride = Callable[[int, np.ndarray], np.ndarray]
# the model's lookahead router -> a prefetcher (for benchmarks that replay or record guesses)
PrefetcherFactory = Callable[[RouterFn], Prefetcher]
# (layer, h (N, d_model), chosen (N, k), weights (N, k), live (N, k) bool or None, batch) -> contrib (N, k, d_model):
# each chosen (row, choice)'s weighted expert output, computed elsewhere (shards.ShardedExperts)
RemoteExperts = Callable[[int, np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None", object], np.ndarray]


@dataclass(frozen=True)
class ModelHooks:
    trace: TraceFn | None = None
    routing_override: RoutingOverride | None = None
    approx: Approx | None = None  # None or exact: the family's routing, bit for bit
    history: RoutingHistory | None = None  # the learning cache's file (history.py), saved when the engine closes
    experts: RemoteExperts | None = None  # None: this process reads and computes the experts
