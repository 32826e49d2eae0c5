"""The overview's and the requests view's text from `Figures` (pure: rich Text, nothing drawn here). Every line is
plain ASCII and at most WIDTH columns, so the screen keeps its alignment over any terminal; colours only repeat it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.text import Text

from .poll import Buckets, Figures, Latency

WIDTH = 78
LABEL = 13  # the left column's width
SPARK = "_.:-=+*#%@"  # lowest to highest, ASCII


# ---------------------------------------------------------------------- numbers
def num(x: float | None, prec: int = 1) -> str:
    """A count or a rate: '-' when unknown, thousands as k, millions as M."""
    if x is None:
        return "-"
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.1f}M"
    if ax >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:,.0f}" if prec == 0 or ax >= 100 else f"{x:.{prec}f}"


def count(x: float | None) -> str:
    return "-" if x is None else f"{int(x):,}" if x < 1e7 else num(x)


def secs(s: float | None) -> str:
    """A duration: '-' when unknown, ms below a second."""
    if s is None:
        return "-"
    if s < 0.01:
        return f"{s * 1e3:.1f} ms" if s >= 0.001 else f"{s * 1e3:.2f} ms"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def size(b: float | None) -> str:
    """Bytes in binary units (KiB = 1024 B)."""
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"  # pragma: no cover - the loop returns


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def uptime(s: float) -> str:
    s = int(s)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def spark(values: Sequence[float], width: int) -> str:
    """The last `width` values as one character each, scaled to their maximum (ASCII: _ lowest, @ highest)."""
    values = list(values)[-width:]
    top = max(values, default=0.0)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, math.ceil((len(SPARK) - 1) * v / top))] for v in values)


# ---------------------------------------------------------------------- views
def _line(out: Text, label: str, *parts: str | tuple[str, str]) -> None:
    """One line: the label in its column, then parts (text, or (text, style))."""
    out.append(label.ljust(LABEL), "bold")
    for part in parts:
        if isinstance(part, tuple):
            out.append(*part)
        else:
            out.append(part)
    out.append("\n")


def _lat(lat: Latency) -> tuple[tuple[str, str], str]:
    recent = (f"p50 {secs(lat.p50)}  p95 {secs(lat.p95)}", "bold cyan")
    return recent, f"  n={num(lat.n, 0)}   all: p50 {secs(lat.life_p50)} p95 {secs(lat.life_p95)}"


def overview(f: Figures, gen_history: Sequence[float] = (), width: int = WIDTH) -> Text:
    out = Text(no_wrap=True, overflow="crop")
    _line(out, "Tokens", "generated ", (f"{num(f.gen_tps)} tok/s", "bold green"), "  prompt ",
          (f"{num(f.prompt_tps)} tok/s", "bold green"), f"  {num(f.tokens_per_step)} tok/step")
    done = sum(f.finished.values())
    _line(out, "Requests", "running ", (f"{f.running}/{f.max_concurrency}", "bold"), "  queued ",
          (f"{f.waiting}/{f.max_queue}", "bold"), f"  finished {done:,} (+{sum(f.finished_recent.values()):,} recent)")
    _line(out, "First token", *_lat(f.ttft))
    _line(out, "Token gap", *_lat(f.itl))
    if not f.has_engine:
        out.append(f"\n(no engine yet: the server is {f.state}; expert, disk and cache figures follow when it is up)\n",
                   "yellow")
    else:
        _line(out, "Experts", "hit rate ", (pct(f.hit_rate), "bold green"), f" (all {pct(f.life_hit_rate)})  "
              f"{num(f.lookups_ps)} lookups/s  {num(f.loads_ps)} loads/s")
        _line(out, "", f"evictions {num(f.evictions_ps)}/s   waiting for experts "
              f"{pct(f.wait_share) if f.wait_share is not None else '-'} of the time"
              + ("   (counters restarted: new engine)" if f.restarted else ""))
        _line(out, "Prefetch", f"{f.prefetch_mode}: used ", (f"{num(f.prefetch_used_ps)}/s", "bold"), "  wasted ",
              (f"{num(f.prefetch_wasted_ps)}/s", "bold"),
              f"  (all: {num(f.life_prefetch_used, 0)}/{num(f.life_prefetch_wasted, 0)})")
        _line(out, "Disk", (f"{num(None if f.disk_bps is None else f.disk_bps / 2**20)} MiB/s", "bold green"),
              f"  {num(f.reads_ps)} reads/s  mean {secs(f.read_mean_s)}  {f.io}  retries {f.retries}")
        ms, rd = f.read_ms, f.read
        _line(out, "", f"read p50 {secs(rd.p50)}  p95 {secs(rd.p95)}   all: "
              + " ".join(f"{k} {ms[k]:.2f}" for k in ("p95", "p99") if k in ms) + (" ms" if ms else ""))
        _line(out, "Cache", (f"{f.resident}/{f.slots}", "bold"), f" slots held, {f.loading} loading, of {f.experts} "
              f"experts; {size(f.slot_bytes)} each")
        _line(out, "", f"budget {size(f.budget_bytes)}   arena in RAM "
              f"{size(f.arena_rss_bytes) if f.arena_rss_bytes is not None else '- (mapped)'}")
    _line(out, "Memory", "RSS ", (size(f.rss_bytes), "bold"), f"  peak {size(f.peak_rss_bytes)}")
    if gen_history:
        top = max(gen_history)
        n = min(len(gen_history), width)
        out.append(f"\ngenerated tok/s, last {n} reading{'s' * (n > 1)} (top {num(top)}):\n", "bold")
        out.append(spark(gen_history, width), "green")
    return crop(out, width)


def crop(text: Text, width: int) -> Text:
    """`text` with every line cut to `width` columns and no trailing blank lines."""
    text.rstrip()
    lines = text.split("\n", allow_blank=True)
    for line in lines:
        line.truncate(width)
    out = Text("\n", no_wrap=True, overflow="crop").join(lines)
    out.no_wrap, out.overflow = True, "crop"
    return out


def bucket_label(bound: float, prev: float) -> str:
    if math.isinf(bound):
        return f">{secs(prev).replace(' ', '')}"
    return f"<={secs(bound).replace(' ', '')}"


def histogram(title: str, lat: Latency, width: int, rows: int | None = None) -> list[str]:
    """A latency histogram's lines (at most `width` wide): the recent window's per-bucket counts as bars of #."""
    counts: Buckets = lat.recent
    which = "all so far" if lat.recent_is_lifetime else f"recent, n={lat.n:,}"
    lines = [f"{title} ({which})"[:width]]
    used = [i for i, (_, c) in enumerate(counts) if c]
    if not used:
        return lines + ["  (no observations yet)"]
    lo, hi = used[0], used[-1]
    if rows is not None and hi - lo + 1 > rows:
        lo = max(0, hi - rows + 1)
    top = max(c for _, c in counts)
    n_w = len(f"{top:,}")
    bar_w = max(4, width - 9 - n_w - 2)
    for i in range(lo, hi + 1):
        bound, c = counts[i]
        bar = "#" * (math.ceil(bar_w * c / top) if c else 0)
        lines.append(f"{bucket_label(bound, counts[i - 1][0] if i else 0.0):>9} {bar:<{bar_w}} {c:>{n_w},}"[:width])
    return lines


def requests(f: Figures, width: int = WIDTH, height: int | None = None) -> Text:
    out = Text(no_wrap=True, overflow="crop")
    _line(out, "Requests", "running ", (f"{f.running}", "bold"), f" of {f.max_concurrency}   queued ",
          (f"{f.waiting}", "bold"), f" of {f.max_queue}")
    fin = "   ".join(f"{k} {v:,} (+{f.finished_recent.get(k, 0):,})" for k, v in sorted(f.finished.items()))
    _line(out, "Finished", fin or "none yet", "  (all, +recent)" if fin else "")
    _line(out, "Tokens", f"prompt {count(f.prompt)} ({num(f.prompt_tps)}/s)   generated {count(f.generated)} "
          f"({num(f.gen_tps)}/s)")
    _line(out, "Steps", f"{count(f.steps)} ({num(f.steps_ps)}/s), {num(f.tokens_per_step)} tokens per step")
    _line(out, "Server", f"{f.state}, up {uptime(f.uptime_s)}, recent = last {f.dt:.1f} s")
    out.append("\n")
    col = (width - 3) // 2
    rows = None if height is None else max(3, height - 8)
    left = histogram("Time to first token", f.ttft, col, rows)
    right = histogram("Time between tokens", f.itl, col, rows)
    for i in range(max(len(left), len(right))):
        a, b = left[i] if i < len(left) else "", right[i] if i < len(right) else ""
        style = "bold" if i == 0 else ""
        out.append(a.ljust(col), style)
        out.append(" | ", "bright_black")
        out.append(b + "\n", style)
    return crop(out, width)
