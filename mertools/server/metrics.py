"""The server's Prometheus metrics, with prometheus_client.

Each app has a registry of its own (tests and embedders create many apps in one process). Request
figures are pushed by the app and the scheduler into prometheus_client's thread-safe metrics; the
engine's figures (expert cache, disk reads) stay where the engine keeps them and are read at scrape
time by `EngineCollector`, so nothing is copied, accumulated twice or kept per read here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
# seconds: from sub-millisecond (tiny models, cached experts) to a minute (a huge prompt behind a queue)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# bounds of the store's own histogram (mertools.runtime.stats.BOUNDS), so these counts are exact
READ_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class EngineCollector(Collector):
    """The engine's totals at scrape time: expert cache lookups, hits and misses, bytes read and the
    store's read-latency histogram. Reads plain attributes only (ints, and one locked snapshot of the
    histogram), so it is safe beside the scheduler thread; zeros while the engine is loading."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._engine()))

    @staticmethod
    def _families(engine: Any) -> Iterator[Metric]:
        stats = getattr(getattr(engine, "cache", None), "stats", None)
        store = getattr(engine, "store", None)
        for name, attr, doc in (("mertools_expert_lookups", "lookups", "Expert cache lookups."),
                                ("mertools_expert_cache_hits", "hits", "Expert cache hits."),
                                ("mertools_expert_cache_misses", "misses", "Expert cache misses.")):
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr, 0))
        yield CounterMetricFamily("mertools_expert_bytes_read", "Bytes of expert files read from disk.",
                                  value=getattr(store, "bytes_read", 0))
        spec = getattr(engine, "spec", None)  # speculative decoding (serve --draft)
        yield CounterMetricFamily("mertools_draft_tokens", "Tokens drafted for speculative decoding.",
                                  value=getattr(spec, "drafted", 0))
        yield CounterMetricFamily("mertools_draft_accepted_tokens", "Drafted tokens the model accepted.",
                                  value=getattr(spec, "accepted", 0))
        hist = getattr(store, "read_latency", None)
        counts, total, n = hist.cumulative(READ_BUCKETS) if hist is not None else ([0] * len(READ_BUCKETS), 0.0, 0)
        buckets = [(floatToGoString(b), c) for b, c in zip(READ_BUCKETS, counts, strict=True)] + [("+Inf", n)]
        yield HistogramMetricFamily("mertools_expert_read_latency_seconds", "Time to read (and checksum) one expert file.",
                                    buckets=buckets, sum_value=total)


class _WithoutCreated:
    """The registry minus prometheus_client's `*_created` series: they would double the series of
    every counter and histogram, and the documented metric list has none."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class ServerMetrics:
    """The server's metrics. `running`, `waiting` and `engine` are read at scrape time."""

    def __init__(self, running: Callable[[], float] = lambda: 0, waiting: Callable[[], float] = lambda: 0,
                 engine: Callable[[], Any] = lambda: None) -> None:
        r = self.registry = CollectorRegistry()
        # prometheus_client appends "_total" to a counter's name in the exposition
        self.requests = Counter("mertools_requests", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"), registry=r)
        self.finished = Counter("mertools_generations_finished",
                                "Generations (one per choice) by how they ended: stop, length, cancelled, error.",
                                ("reason",), registry=r)
        self.prompt_tokens = Counter("mertools_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("mertools_generation_tokens", "Tokens generated (sampled).", registry=r)
        self.ttft = Histogram("mertools_time_to_first_token_seconds",
                              "From a request's arrival in the queue to its first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mertools_inter_token_latency_seconds", "Between consecutive generated tokens of one request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mertools_request_duration_seconds", "From a generation's arrival in the queue to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("mertools_requests_running", "Sequences in the running batch.", registry=r)
        self.running.set_function(running)
        self.waiting = Gauge("mertools_requests_waiting", "Sequences queued for a batch slot.", registry=r)
        self.waiting.set_function(waiting)
        self.steps = Counter("mertools_engine_steps", "Batched engine forward steps.", registry=r)
        self.step_tokens = Counter("mertools_engine_step_tokens",
                                   "Tokens fed through engine steps (prompt chunks plus decoded tokens).", registry=r)
        r.register(EngineCollector(engine))
        self._exposed = _WithoutCreated(r)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(self._exposed).decode("utf-8")  # type: ignore[arg-type]
