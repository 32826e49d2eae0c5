"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges, histograms.

Everything is updated from two threads (the scheduler's and the event loop's), so each metric has a
lock; rendering takes a consistent copy of each metric, not of all of them at once.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from sub-millisecond (tiny models, cached experts) to a minute (a huge prompt behind a queue)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
READ_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

Labels = tuple[str, ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, Any]) -> Labels:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[Labels, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, total: float, **labels: Any) -> None:
        """For totals kept elsewhere (the engine's own counters), copied in at scrape time."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = max(self._values.get(key, 0.0), float(total))

    def value(self, **labels: Any) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help)
        self._read = read
        self._value = 0.0

    def set(self, v: float) -> None:
        with self._lock:
            self._value = float(v)

    def value(self) -> float:
        if self._read is not None:
            return float(self._read())
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._n = 0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)  # le= is inclusive
        with self._lock:
            self._counts[i] += 1
            self._sum += v
            self._n += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._n

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        lines, acc = self.header(), 0
        for le, c in zip((*self.buckets, math.inf), counts, strict=True):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(le)}"}} {acc}')
        return lines + [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {n}"]


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> Any:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


class ServerMetrics:
    """The server's metrics. Request-level figures are pushed by the app and the scheduler; the
    engine's (expert cache, disk reads) are pulled from it at scrape time by `collect_engine`."""

    def __init__(self, running: Callable[[], float] = lambda: 0, waiting: Callable[[], float] = lambda: 0) -> None:
        r = self.registry = Registry()
        self.requests = r.add(Counter("mertools_requests_total", "HTTP requests by endpoint and status code.",
                                      ("endpoint", "status")))
        self.finished = r.add(Counter("mertools_generations_finished_total",
                                      "Generations (one per choice) by how they ended: stop, length, cancelled, error.",
                                      ("reason",)))
        self.prompt_tokens = r.add(Counter("mertools_prompt_tokens_total", "Prompt tokens prefilled."))
        self.generated_tokens = r.add(Counter("mertools_generation_tokens_total", "Tokens generated (sampled)."))
        self.ttft = r.add(Histogram("mertools_time_to_first_token_seconds",
                                    "From a request's arrival in the queue to its first generated token."))
        self.itl = r.add(Histogram("mertools_inter_token_latency_seconds",
                                   "Between consecutive generated tokens of one request."))
        self.e2e = r.add(Histogram("mertools_request_duration_seconds",
                                   "From a generation's arrival in the queue to its last token."))
        self.running = r.add(Gauge("mertools_requests_running", "Sequences in the running batch.", running))
        self.waiting = r.add(Gauge("mertools_requests_waiting", "Sequences queued for a batch slot.", waiting))
        self.steps = r.add(Counter("mertools_engine_steps_total", "Batched engine forward steps."))
        self.step_tokens = r.add(Counter("mertools_engine_step_tokens_total",
                                         "Tokens fed through engine steps (prompt chunks plus decoded tokens)."))
        self.lookups = r.add(Counter("mertools_expert_lookups_total", "Expert cache lookups."))
        self.hits = r.add(Counter("mertools_expert_cache_hits_total", "Expert cache hits."))
        self.misses = r.add(Counter("mertools_expert_cache_misses_total", "Expert cache misses."))
        self.bytes_read = r.add(Counter("mertools_expert_bytes_read_total", "Bytes of expert files read from disk."))
        self.read_latency = r.add(Histogram("mertools_expert_read_latency_seconds",
                                            "Time to read (and checksum) one expert file.", READ_BUCKETS))
        self._reads_seen = 0
        self._collect_lock = threading.Lock()

    def collect_engine(self, engine: Any) -> None:
        """Copy the engine's counters in. Only reads plain attributes (ints, a list that only grows),
        so it is safe beside the scheduler thread without calling into the engine."""
        stats, store = engine.cache.stats, engine.store
        self.lookups.set_total(stats.lookups)
        self.hits.set_total(stats.hits)
        self.misses.set_total(stats.misses)
        self.bytes_read.set_total(store.bytes_read)
        with self._collect_lock:  # feed each new read once into the histogram
            reads = store.read_seconds
            n = len(reads)
            for s in reads[self._reads_seen:n]:
                self.read_latency.observe(s)
            self._reads_seen = n

    def render(self, engine: Any | None = None) -> str:
        if engine is not None:
            self.collect_engine(engine)
        return self.registry.render()
