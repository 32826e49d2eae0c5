"""The runtime's figures in fixed-size, typed form: a latency histogram (instead of one float per read
kept for the life of the process), the engine's timers and the figures `Engine.stats()` reports."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# 20 bounds per decade, 10**(k/20) rounded to two significant digits so that the 1-2.5-5 bounds of
# Prometheus-style buckets are exact members; neighbours differ by a factor 1.08-1.18
_MANTISSAS = ("1.0", "1.1", "1.3", "1.4", "1.6", "1.8", "2.0", "2.2", "2.5", "2.8",
              "3.2", "3.5", "4.0", "4.5", "5.0", "5.6", "6.3", "7.1", "7.9", "8.9")
# seconds, 10 us to 100 s: a cached expert's checksum to a disk that has all but stopped
BOUNDS: tuple[float, ...] = (*(float(f"{m}e{e}") for e in range(-5, 2) for m in _MANTISSAS), 100.0)


class LatencyHistogram:
    """Count, sum, min, max and per-bucket counts of durations (seconds) over BOUNDS: a fixed size
    whatever the number of observations. Bucket i holds BOUNDS[i-1] < v <= BOUNDS[i]; the last one
    everything above 100 s. Percentiles are estimated by interpolating geometrically inside the bucket
    where the rank falls, clamped to the observed min and max, so an estimate lies within one bucket
    (8-18%) of the true value. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(BOUNDS) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(BOUNDS, seconds)
        with self._lock:
            self._counts[i] += 1
            self.count += 1
            self.sum += seconds
            self.min = min(self.min, seconds)
            self.max = max(self.max, seconds)

    def percentile(self, p: float) -> float:
        """Estimated p-th percentile (0 <= p <= 100) in seconds; 0.0 before any observation."""
        s = self.snapshot()
        return estimate_percentile(s.counts, BOUNDS, s.count, s.min, s.max, p)

    def snapshot(self) -> HistogramSnapshot:
        """Per-bucket counts, count, sum, min and max in one consistent snapshot (a routing trace's last record)."""
        with self._lock:
            return HistogramSnapshot(tuple(self._counts), self.count, self.sum, self.min, self.max)

    def cumulative(self, bounds: Sequence[float]) -> tuple[list[int], float, int]:
        """(observations <= each bound, sum, count) in one consistent snapshot, for a Prometheus
        histogram whose bucket bounds are members of BOUNDS (so the counts are exact)."""
        idx = []
        for b in bounds:
            i = bisect.bisect_left(BOUNDS, b)
            if i == len(BOUNDS) or BOUNDS[i] != b:
                raise ValueError(f"bucket bound {b} is not one of the histogram's bounds (10 us .. 100 s, 20 a decade)")
            idx.append(i)
        with self._lock:
            counts, total, n = list(self._counts), self.sum, self.count
        running, acc, out = 0, 0, []
        for i in idx:
            while running <= i:
                acc += counts[running]
                running += 1
            out.append(acc)
        return out, total, n


@dataclass(frozen=True)
class HistogramSnapshot:
    """A LatencyHistogram's figures at one moment: counts[i] per bucket of BOUNDS (the last one above them)."""

    counts: tuple[int, ...]
    count: int
    sum: float
    min: float  # inf before any observation
    max: float


def estimate_percentile(counts: Sequence[int], bounds: Sequence[float], n: int, lo_seen: float, hi_seen: float,
                        p: float) -> float:
    """The p-th percentile (0..100) of `n` observations counted per bucket of `bounds` (len(bounds) + 1 counts, the
    last above them) between lo_seen and hi_seen: geometric interpolation inside the bucket where the rank falls,
    clamped to the observed min and max; 0.0 when n is 0. LatencyHistogram.percentile, and for recorded counts."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must lie in 0..100, got {p}")
    if n == 0:
        return 0.0
    rank = max(1.0, p / 100 * n)  # the rank-th smallest observation, fractional
    below = 0
    for i, c in enumerate(counts):
        if c and below + c >= rank:
            lo = max(bounds[i - 1] if i else lo_seen, lo_seen)
            hi = min(bounds[i] if i < len(bounds) else hi_seen, hi_seen)
            frac = (rank - below) / c
            return lo * (hi / lo) ** frac if lo > 0 else hi * frac
        below += c
    return hi_seen


@dataclass
class RunTimes:
    """What the engine accumulates over its generations and forward steps."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    forward_s: float = 0.0  # every forward step, generate's and the server's
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float | None = None  # of the first generation
    warmup_s: float = 0.0  # Engine.warmup's time, and numba's compiling during generation (left out of the above)


@dataclass(frozen=True)
class RunStats:
    """`Engine.stats()` in typed form; `to_dict()` gives the keys `mertools run --json` writes."""

    prompt_tokens: int
    prefill_tok_s: float
    warmup_s: float
    generated_tokens: int
    decode_tok_s: float
    ttft_s: float | None
    expert_lookups: int
    expert_hits: int
    expert_misses: int
    hit_rate: float
    bytes_read: int
    read_mb_s: float  # bytes read / time spent reading, per read (reads overlap)
    read_latency_ms: dict[int, float]  # {50: p50, 95: p95, 99: p99}
    read_wait_share: float
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    prefetch_cancelled: int
    read_retries: int
    cache_slots: int
    cache_mb: float
    prefetch: str
    o_direct: bool | None
    peak_rss_mb: float
    keep_pages: bool = False  # buffered reads that leave the layout in the page cache for the next process
    mapped: bool = False  # slots map the expert files (--io mmap): "reads" are mappings of page-cache pages
    # packed copies (runtime/packed.py) of experts and of the dense weights this run mapped, and wrote for the next
    # (written by the time the engine has closed)
    packed_copies_mapped: int = 0
    packed_copies_written: int = 0
    prefetch_ahead: int = 0  # of prefetch_issued, guesses beyond the next layer, read while the disk was idle
    prefetch_depth: int = 1  # layers the lookahead guessed ahead
    kv_dtype: str = "f16"
    kernels: str = "exact"  # "exact" float kernels, or "int8" (8-bit activations, kernels/int8.py)
    compiled_steps: int = 0  # decode steps run in one compiled call (runtime/fused.py)
    experts_filled: int = 0  # experts the background fill read (runtime/fill.py), in bytes_read too
    kv_bytes_per_token: int = 0  # of context, every layer's keys and values
    kv_mb: float = 0.0  # what the engine's KV cache holds now (its capacity)
    # approximate routing (runtime/approx.py): its settings ("exact" when off), the expert choices the router
    # makes per token (k x MoE layers), and how many of them it skipped and replaced, in all and per token
    approx: str = "exact"
    expert_choices_per_token: int = 0
    approx_dropped: int = 0
    approx_substituted: int = 0
    approx_dropped_per_token: float = 0.0
    approx_substituted_per_token: float = 0.0
    approx_standins: int = 0  # choices computed with a low-bit stand-in (standin_share), in all and per token
    approx_standins_per_token: float = 0.0
    standin_bytes_read: int = 0  # of bytes_read, the stand-ins' share
    # the learning cache (--history): experts loaded at open from the history, token positions behind it then
    history_preloaded: int = 0
    history_tokens: float = 0.0
    # speculative decoding (generate with a draft): verification steps, drafted and accepted tokens, their ratio,
    # and tokens generated per verification step
    spec_steps: int = 0
    draft_proposed: int = 0
    draft_accepted: int = 0
    draft_acceptance: float = 0.0
    tokens_per_step: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
