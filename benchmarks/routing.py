"""Routing traces for the beyond-RAM benchmark, and replaying them through cache policies.

Synthetic traces stand in for a trained model's routing (documented as such): per layer a mildly
skewed popularity (Dirichlet), and temporal locality (a token reuses one of the previous token's
experts with probability `stickiness`), the two properties a cache can exploit. Policies are the
runtime's own ExpertCache driven by an instant fake loader; Belady's rule (evict the expert whose
next use is farthest) gives the optimum at the same capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from mertools.runtime.cache import ExpertCache

Trace = list[list[list[int]]]  # token -> layer -> experts chosen


def synthetic_trace(n_tokens: int, n_layers: int, n_experts: int, k: int, seed: int = 0,
                    concentration: float = 4.0, stickiness: float = 0.3) -> Trace:
    rng = np.random.default_rng(seed)
    pops = rng.dirichlet(np.full(n_experts, concentration), size=n_layers)  # (L, E)
    trace: Trace = []
    prev: list[list[int]] | None = None
    for _ in range(n_tokens):
        token = []
        for layer in range(n_layers):
            chosen: list[int] = []
            if prev is not None and rng.random() < stickiness:
                chosen.append(int(rng.choice(prev[layer])))
            p = pops[layer].copy()
            p[chosen] = 0
            chosen += [int(e) for e in rng.choice(n_experts, k - len(chosen), replace=False, p=p / p.sum())]
            token.append(chosen)
        trace.append(token)
        prev = token
    return trace


def trace_from_records(records: Sequence[dict], n_layers: int) -> Trace:
    """A `run --trace-out` file's records -> Trace (positions in order)."""
    by_pos: dict[int, list[list[int]]] = {}
    for r in records:
        by_pos.setdefault(r["token"], [[] for _ in range(n_layers)])[r["layer"]] = list(r["experts"])
    return [by_pos[p] for p in sorted(by_pos)]


def routing_stats(trace: Trace, n_experts: int) -> list[dict]:
    n_layers = len(trace[0])
    out = []
    for layer in range(n_layers):
        c = np.bincount([e for t in trace for e in t[layer]], minlength=n_experts).astype(float)
        p = c[c > 0] / c.sum()
        out.append({"layer": layer, "distinct": int((c > 0).sum()), "entropy_bits": float(-(p * np.log2(p)).sum())})
    return out


class _Instant:
    """An executor that runs the loader at once: policy replay without I/O or threads."""

    def submit(self, fn, *args):  # noqa: ANN001, ANN201
        f: Future = Future()
        fn(*args)
        f.set_result(None)
        return f


def replay_policy(trace: Trace, n_experts: int, slots: int, policy: str) -> float:
    n_layers = len(trace[0])
    cache = ExpertCache(slots, n_layers, n_experts, lambda key, slot: None, _Instant(), policy=policy)
    for token in trace:
        for layer, experts in enumerate(token):
            cache.note_layer(layer)
            cache.record_routing(layer, experts)
            for key, _ in cache.acquire([(layer, e) for e in experts]):
                cache.release(key)
    return cache.stats.hit_rate


def belady(trace: Trace, slots: int) -> float:
    """Optimal hit rate: on a miss with a full cache, evict the resident expert used farthest ahead
    (never one needed by the current step)."""
    steps = [[(la, e) for e in experts] for token in trace for la, experts in enumerate(token)]
    uses: dict[tuple[int, int], list[int]] = {}
    for i, step in enumerate(steps):
        for key in step:
            uses.setdefault(key, []).append(i)
    ptr = dict.fromkeys(uses, 0)
    resident: set[tuple[int, int]] = set()
    hits = lookups = 0
    for step in steps:
        for key in step:
            ptr[key] += 1  # uses[key][ptr[key]] is now this key's next use after this step
        for key in step:
            lookups += 1
            if key in resident:
                hits += 1
                continue
            if len(resident) >= slots:
                def next_use(k: tuple[int, int]) -> int:
                    u = uses[k]
                    return u[ptr[k]] if ptr[k] < len(u) else 1 << 60
                victim = max((k for k in resident if k not in step), key=next_use)
                resident.remove(victim)
            resident.add(key)
    return hits / lookups
