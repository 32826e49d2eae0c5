"""`GET /stats`: the running server's figures as JSON, for `mertools top` and other tools that draw them.

Counters since the start (tokens, lookups, bytes read...) and the time they were read: a client takes rates from two
readings (a reload to a new layout starts the engine's counters again: a client treats a counter that went down as a
restart). Every figure is read where it is kept (the scheduler, the metrics, the engine's cache and store), nothing
accumulated here, and the per-expert map is the cache's fixed-size arrays.
"""

from __future__ import annotations

import time
from typing import Any

from ..runtime.memory import peak_rss_bytes, resident_bytes, rss_bytes
from .metrics import READ_BUCKETS

STARTED = time.time()


def _histogram(h: Any) -> dict[str, Any]:  # noqa: ANN401 - a prometheus_client Histogram
    """count, sum, cumulative buckets [[upper bound, count], ...] and p50/p95 (linear within a bucket, as Prometheus'
    histogram_quantile) of a histogram since the start; the last bound is "+Inf", as in Prometheus' text."""
    buckets, total, count = [], 0.0, 0
    for metric in h.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), int(s.value)))
            elif s.name.endswith("_sum"):
                total = float(s.value)
            elif s.name.endswith("_count"):
                count = int(s.value)
    return {"count": count, "sum": total, "buckets": [[b if b != float("inf") else "+Inf", c] for b, c in buckets],
            "p50": quantile(buckets, 0.5), "p95": quantile(buckets, 0.95)}


def quantile(buckets: list[tuple[float, int]], q: float) -> float | None:
    """The q-quantile of cumulative buckets (upper bound, count), sorted by bound; None when empty."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank, lo, below = q * buckets[-1][1], 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lo  # beyond the last finite bound: that bound, as Prometheus answers
            return lo + (bound - lo) * ((rank - below) / (count - below) if count > below else 0.0)
        lo, below = bound, count
    return lo


def _counter(c: Any) -> float:  # noqa: ANN401 - a prometheus_client Counter without labels
    return float(next(s.value for m in c.collect() for s in m.samples if s.name.endswith("_total")))


def server_stats(scheduler: Any, metrics: Any, live: Any, heat: bool = True) -> dict[str, Any]:  # noqa: ANN401
    cfg, eng = live.cfg, scheduler.engine
    finished = {s.labels["reason"]: int(s.value) for m in metrics.finished.collect() for s in m.samples
                if s.name.endswith("_total")}
    out: dict[str, Any] = {
        "time": time.time(), "uptime_s": time.time() - STARTED, "state": scheduler.state, "model": cfg.name,
        "layout": str(eng.layout.root) if eng is not None else cfg.layout,
        "requests": {"running": scheduler.n_running, "waiting": scheduler.n_waiting,
                     "max_concurrency": scheduler.max_running, "max_queue": scheduler.max_waiting,
                     "finished": finished},
        "tokens": {"prompt": _counter(metrics.prompt_tokens), "generated": _counter(metrics.generated_tokens),
                   "steps": _counter(metrics.steps)},
        "ttft_s": _histogram(metrics.ttft), "itl_s": _histogram(metrics.itl),
        "memory": {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()},
    }
    if cfg.config_file:
        out["config"] = live.to_dict()
    if eng is None:
        return out
    cache, store = eng.cache, eng.store
    st = cache.stats
    out["experts"] = {"lookups": st.lookups, "hits": st.hits, "misses": st.misses, "hit_rate": st.hit_rate,
                      "loads": st.loads, "evictions": st.evictions, "prefetch_issued": st.prefetch_issued,
                      "prefetch_used": st.prefetch_used, "prefetch_wasted": st.prefetch_wasted,
                      "prefetch_cancelled": st.prefetch_cancelled,
                      "prefetch_ahead": st.prefetch_ahead, "wait_s": st.wait_seconds,
                      "prefetch": eng.model.prefetcher.mode}
    lat = store.read_latency
    counts, total, n = lat.cumulative(READ_BUCKETS)  # the store's own bounds: exact counts
    cum = [(float(b), c) for b, c in zip(READ_BUCKETS, counts, strict=True)] + [(float("inf"), n)]
    out["read_latency_s"] = {"count": n, "sum": total, "buckets": [[b, c] for b, c in cum[:-1]] + [["+Inf", n]],
                             "p50": quantile(cum, 0.5), "p95": quantile(cum, 0.95)}
    out["disk"] = {"bytes_read": store.bytes_read, "reads": lat.count, "read_s": lat.sum, "retries": store.retried,
                   "latency_ms": {f"p{p}": lat.percentile(p) * 1e3 for p in (50, 95, 99)},
                   "o_direct": store.o_direct, "mapped": store.mapped}
    arena = store.arena_bytes
    states = cache.states()
    out["cache"] = {"slots": cache.n_slots, "capacity": cache.capacity, "slot_bytes": store.slot_bytes,
                    "budget_bytes": cache.n_slots * store.slot_bytes, "resident": int((states == 1).sum()),
                    "loading": int((states == 2).sum()), "experts": int(states.size),
                    # the arena's pages in memory (None: mapped slots, which are the page cache's)
                    "arena_rss_bytes": resident_bytes(arena.ctypes.data, arena.nbytes) if arena is not None else None}
    if eng.shards is not None:  # the experts on Ray actors: each shard's own counts (the driver's cache reads none)
        out["shards"] = eng.shards.stats()
    if heat:
        out["heat"] = {"layers": cache.n_layers, "experts": cache.n_experts, "state": states.tolist(),
                       "lookups": cache.lookups_by.tolist(), "hits": cache.hits_by.tolist()}
    return out
