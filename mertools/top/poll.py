"""Reading a server's `GET /stats` and turning two readings into the dashboard's figures.

A reading is /stats' JSON as mertools/server/stats.py writes it: counters since the start and the time they were read.
"Recent" figures are changes between a base reading and the newest one (`History` keeps the base about `window`
seconds back) over the server's clock: rates, the hit rate of the lookups made in between, and percentiles of the
difference of two readings' cumulative histogram buckets. A counter that went down was restarted (a reload to a new
layout starts the engine's counters again, a restarted server all of them): its change is its new value, never
negative. Nothing here draws anything; `fetch_stats` is the only part that does I/O.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any

Reading = dict[str, Any]
Buckets = list[tuple[float, int]]  # cumulative: (upper bound, observations <= bound), the last bound inf
Grid = list[list[int]]

KEY_HINT = "--api-key or $MERTOOLS_API_KEY"


class PollError(Exception):
    """Why a reading failed, in one line a status bar can show."""


def base_url(url: str) -> str:
    """The server's root: a scheme added when missing, a trailing slash or the OpenAI base path (/v1) dropped."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url[:-3] if url.endswith("/v1") else url


def fetch_stats(url: str, api_key: str | None = None, heat: bool = True, timeout: float = 5.0) -> Reading:
    """One reading of URL/stats (without the per-expert map unless `heat`); PollError with a readable reason."""
    root = base_url(url)
    headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    request = urllib.request.Request(root + "/stats" + ("" if heat else "?heat=false"), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        try:
            detail = e.read()
        except (OSError, http.client.HTTPException):
            detail = b""
        raise PollError(http_error(root, e.code, detail, api_key)) from None
    except urllib.error.URLError as e:
        raise PollError(f"cannot reach {root}: {_reason(e.reason, timeout)}") from None
    except (OSError, http.client.HTTPException) as e:  # a timeout or a reset while reading, a broken response
        raise PollError(f"cannot read {root}/stats: {_reason(e, timeout)}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise PollError(f"{root}/stats did not answer JSON: is it a mertools server?") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), dict):
        raise PollError(f"{root}/stats is not a mertools server's statistics")
    return data


def http_error(root: str, status: int, body: bytes, api_key: str | None) -> str:
    if status == 401:
        return (f"401 from {root}: the API key was refused (wrong key? {KEY_HINT})" if api_key else
                f"401 from {root}: the server needs an API key (give {KEY_HINT})")
    if status == 404:
        return f"404 from {root}/stats: not a mertools server, or one without /stats"
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:120]
    return f"HTTP {status} from {root}/stats" + (f": {' '.join(str(message).split())}" if message else "")


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is `mertools serve` running there?)"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return " ".join(str(text).split())


# ---------------------------------------------------------------------- counters and histograms
def delta(new: float | None, old: float | None) -> float:
    """How much a counter grew from `old` to `new`: a counter that went down restarted, so its growth is its new
    value (0 when it is missing now; all of it when it was missing before)."""
    if new is None:
        return 0.0
    if old is None or new < old:
        return float(new)
    return float(new - old)


def rate(new: float | None, old: float | None, dt: float) -> float | None:
    """A counter's growth per second over `dt` seconds; None without a positive interval."""
    return delta(new, old) / dt if dt > 0 else None


def buckets(h: dict[str, Any] | None) -> Buckets | None:
    """/stats' [[le, cumulative count], ...] (the last le "+Inf") as (float bound, int count)."""
    if not h or not h.get("buckets"):
        return None
    return [(math.inf if le in ("+Inf", "Infinity", "inf") else float(le), int(c)) for le, c in h["buckets"]]


def bucket_delta(new: Buckets | None, old: Buckets | None) -> Buckets | None:
    """The cumulative buckets of the observations made between two readings: the newer ones whole when the older
    are missing, have other bounds, or hold more in any bucket (the histogram restarted)."""
    if new is None:
        return None
    if old is None or [b for b, _ in new] != [b for b, _ in old] or any(n < o for (_, n), (_, o) in zip(new, old, strict=True)):
        return list(new)
    return [(b, n - o) for (b, n), (_, o) in zip(new, old, strict=True)]


def quantile(cum: Buckets | None, q: float) -> float | None:
    """The q-quantile of cumulative buckets sorted by bound, linear within a bucket as Prometheus'
    histogram_quantile (beyond the last finite bound: that bound); None without observations."""
    if not cum or cum[-1][1] <= 0:
        return None
    rank, lo, below = q * cum[-1][1], 0.0, 0
    for bound, count in cum:
        if count >= rank:
            if math.isinf(bound):
                return lo
            return lo + (bound - lo) * ((rank - below) / (count - below) if count > below else 0.0)
        lo, below = bound, count
    return lo


def per_bucket(cum: Buckets | None) -> Buckets:
    """Cumulative buckets as (upper bound, observations in that bucket alone)."""
    out, below = [], 0
    for bound, count in cum or []:
        out.append((bound, max(count - below, 0)))
        below = count
    return out


def grid_delta(new: Grid, old: Grid | None) -> Grid:
    """Per-cell growth of a layer x expert counter map (a cell that went down restarted; another shape: all new)."""
    if old is None or len(new) != len(old) or any(len(a) != len(b) for a, b in zip(new, old, strict=True)):
        return [list(row) for row in new]
    return [[n - o if n >= o else n for n, o in zip(rn, ro, strict=True)] for rn, ro in zip(new, old, strict=True)]


# ---------------------------------------------------------------------- readings over time
class History:
    """The readings of about the last `window` seconds: `base()` is the newest one at least `window` older than the
    newest (or the oldest kept), the other end of every "recent" figure. A clock that went back starts again."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.readings: deque[Reading] = deque()

    def add(self, reading: Reading) -> None:
        if self.readings and reading["time"] < self.readings[-1]["time"]:
            self.readings.clear()
        self.readings.append(reading)
        while len(self.readings) > 2 and self.readings[1]["time"] <= reading["time"] - self.window:
            self.readings.popleft()

    def base(self) -> Reading | None:
        return self.readings[0] if len(self.readings) > 1 else None

    def latest(self) -> Reading | None:
        return self.readings[-1] if self.readings else None

    def clear(self) -> None:
        self.readings.clear()


def get(reading: Reading | None, *path: str) -> Any:  # noqa: ANN401 - a JSON value
    """reading[path[0]][path[1]]...; None where any part is missing."""
    value: Any = reading
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


@dataclass
class Latency:
    """A histogram's recent p50/p95 (None: no observation in the window), their count, and the lifetime ones."""

    p50: float | None = None
    p95: float | None = None
    n: int = 0
    life_p50: float | None = None
    life_p95: float | None = None
    life_n: int = 0
    recent: Buckets = field(default_factory=list)  # per-bucket counts of the window (lifetime's when it has none)
    recent_is_lifetime: bool = True


def latency(cur: Reading, base: Reading | None, name: str) -> Latency:
    new = buckets(cur.get(name))
    life_n = new[-1][1] if new else 0
    out = Latency(life_p50=quantile(new, 0.5), life_p95=quantile(new, 0.95), life_n=life_n)
    if base is not None:
        window = bucket_delta(new, buckets(base.get(name)))
        out.p50, out.p95 = quantile(window, 0.5), quantile(window, 0.95)
        out.n = window[-1][1] if window else 0
        if out.n:
            out.recent, out.recent_is_lifetime = per_bucket(window), False
    if out.recent_is_lifetime:
        out.recent = per_bucket(new)
    return out


@dataclass
class Figures:
    """What the dashboard shows, from the newest reading and (for the recent ones) a base reading `dt` seconds
    older; a recent figure is None when there is no base yet (or nothing happened that it could be taken over)."""

    model: str = "?"
    state: str = "?"
    layout: str = ""
    uptime_s: float = 0.0
    time: float = 0.0
    dt: float = 0.0  # seconds between the base and the newest reading (0: no base)
    has_engine: bool = False
    # tokens and requests
    gen_tps: float | None = None
    prompt_tps: float | None = None
    steps_ps: float | None = None
    tokens_per_step: float | None = None
    generated: float = 0.0
    prompt: float = 0.0
    steps: float = 0.0
    running: int = 0
    waiting: int = 0
    max_concurrency: int = 0
    max_queue: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    finished_recent: dict[str, int] = field(default_factory=dict)
    ttft: Latency = field(default_factory=Latency)
    itl: Latency = field(default_factory=Latency)
    read: Latency = field(default_factory=Latency)  # one expert file's read (and checksum)
    # experts
    hit_rate: float | None = None  # of the lookups in the window
    life_hit_rate: float | None = None
    lookups_ps: float | None = None
    loads_ps: float | None = None
    evictions_ps: float | None = None
    wait_share: float | None = None  # seconds waited for experts per second
    prefetch_mode: str = "-"
    prefetch_used_ps: float | None = None
    prefetch_wasted_ps: float | None = None
    life_prefetch_used: int = 0
    life_prefetch_wasted: int = 0
    # disk
    disk_bps: float | None = None
    reads_ps: float | None = None
    read_mean_s: float | None = None  # mean time of the window's reads
    read_ms: dict[str, float] = field(default_factory=dict)  # lifetime p50/p95/p99 (ms)
    retries: int = 0
    io: str = "-"
    # cache and memory
    slots: int = 0
    capacity: int = 0
    resident: int = 0
    loading: int = 0
    experts: int = 0
    slot_bytes: int = 0
    budget_bytes: int = 0
    arena_rss_bytes: int | None = None
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    restarted: bool = False  # an engine counter went down in the window (a reload to a new layout)


def figures(cur: Reading, base: Reading | None = None) -> Figures:
    """The figures of the newest reading `cur`, the recent ones over the time since `base` (None: none of those)."""
    f = Figures(model=str(cur.get("model", "?")), state=str(cur.get("state", "?")), layout=str(cur.get("layout", "")),
                uptime_s=float(cur.get("uptime_s") or 0.0), time=float(cur.get("time") or 0.0))
    req = cur.get("requests") or {}
    f.running, f.waiting = int(req.get("running") or 0), int(req.get("waiting") or 0)
    f.max_concurrency, f.max_queue = int(req.get("max_concurrency") or 0), int(req.get("max_queue") or 0)
    f.finished = {str(k): int(v) for k, v in (req.get("finished") or {}).items()}
    f.generated, f.prompt, f.steps = (float(get(cur, "tokens", k) or 0.0) for k in ("generated", "prompt", "steps"))
    f.ttft, f.itl = latency(cur, base, "ttft_s"), latency(cur, base, "itl_s")
    f.read = latency(cur, base, "read_latency_s")
    mem = cur.get("memory") or {}
    f.rss_bytes, f.peak_rss_bytes = int(mem.get("rss_bytes") or 0), int(mem.get("peak_rss_bytes") or 0)
    ex, disk, cache = cur.get("experts"), cur.get("disk"), cur.get("cache")
    f.has_engine = ex is not None
    if ex:
        f.life_hit_rate = ex["hits"] / ex["lookups"] if ex.get("lookups") else None
        f.prefetch_mode = str(ex.get("prefetch", "-"))
        f.life_prefetch_used, f.life_prefetch_wasted = int(ex.get("prefetch_used", 0)), int(ex.get("prefetch_wasted", 0))
    if disk:
        f.read_ms = {k: float(v) for k, v in (disk.get("latency_ms") or {}).items()}
        f.retries = int(disk.get("retries") or 0)
        f.io = "mmap" if disk.get("mapped") else "O_DIRECT" if disk.get("o_direct") else "buffered"
    if cache:
        for name in ("slots", "capacity", "resident", "loading", "experts", "slot_bytes", "budget_bytes"):
            setattr(f, name, int(cache.get(name) or 0))
        f.arena_rss_bytes = cache.get("arena_rss_bytes")
    if base is None:
        return f
    f.dt = dt = f.time - float(base.get("time") or 0.0)
    if dt <= 0:
        f.dt = 0.0
        return f

    def r(*path: str) -> float | None:
        return rate(get(cur, *path), get(base, *path), dt)

    f.gen_tps, f.prompt_tps, f.steps_ps = r("tokens", "generated"), r("tokens", "prompt"), r("tokens", "steps")
    steps = delta(get(cur, "tokens", "steps"), get(base, "tokens", "steps"))
    f.tokens_per_step = delta(get(cur, "tokens", "generated"), get(base, "tokens", "generated")) / steps if steps else None
    f.finished_recent = {k: int(delta(v, get(base, "requests", "finished", k))) for k, v in f.finished.items()}
    if ex:
        f.restarted = any(get(base, "experts", k) is not None and ex[k] < get(base, "experts", k)
                          for k in ("lookups", "loads"))
        lookups = delta(ex.get("lookups"), get(base, "experts", "lookups"))
        f.hit_rate = delta(ex.get("hits"), get(base, "experts", "hits")) / lookups if lookups else None
        f.lookups_ps, f.loads_ps, f.evictions_ps = r("experts", "lookups"), r("experts", "loads"), r("experts", "evictions")
        f.wait_share = r("experts", "wait_s")
        f.prefetch_used_ps, f.prefetch_wasted_ps = r("experts", "prefetch_used"), r("experts", "prefetch_wasted")
    if disk:
        f.disk_bps, f.reads_ps = r("disk", "bytes_read"), r("disk", "reads")
        reads = delta(disk.get("reads"), get(base, "disk", "reads"))
        f.read_mean_s = delta(disk.get("read_s"), get(base, "disk", "read_s")) / reads if reads else None
    return f


def recent_heat(cur: Reading, base: Reading | None) -> tuple[Grid | None, Grid | None]:
    """(hits, lookups) per layer x expert between the base's map and the newest one (None without a base map)."""
    new, old = cur.get("heat"), (base or {}).get("heat")
    if not new or not old:
        return None, None
    return grid_delta(new["hits"], old["hits"]), grid_delta(new["lookups"], old["lookups"])
