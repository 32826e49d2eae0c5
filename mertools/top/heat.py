"""The per-layer x expert map of /stats (`heat`) as a rich Text that fits a width (and a height): which experts the
cache holds and which ones the recent lookups hit.

Experts are binned into columns and layers into rows when there are more than fit (a bin of a column covers
`experts_per_col` neighbouring experts, of a row `layers_per_row` neighbouring layers; the last bin may cover fewer),
and the legend says so. One character per bin carries the meaning, colours only repeat it:
`1`-`9` recent hits (9: as many as the hottest bin, linear, any hit at least 1), otherwise what the cache holds of the
bin: `o` all of it, `:` some, `.` none, `~` some being read. Right of each row: experts held / in the row, and the
recent hit rate of the row's lookups; below the map, the hottest single experts with their recent hits.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from rich.text import Text

Grid = list[list[int]]

MODES = ("both", "hits", "held")  # what the cells show: hits else residency, hits only, residency only
LEVELS = "123456789"
HELD, SOME, NONE, LOADING = "o", ":", ".", "~"
STYLE = {HELD: "bold green", SOME: "green", NONE: "bright_black", LOADING: "yellow"}
HEADER_LINES = 4  # the two legend lines and the expert axis above the map, the hottest bins below


def per_bin(n: int, most: int) -> int:
    """How many neighbouring items one bin covers so that `n` of them take at most `most` bins."""
    return max(1, math.ceil(n / max(1, most)))


def bin_sums(grid: Grid, rows_per: int, cols_per: int) -> Grid:
    """Sums of `grid` over bins of rows_per x cols_per neighbouring cells (every cell in exactly one bin)."""
    rows = [[sum(row[c:c + cols_per]) for c in range(0, len(row), cols_per)] for row in grid]
    return [[sum(col) for col in zip(*rows[r:r + rows_per], strict=True)] for r in range(0, len(rows), rows_per)]


def bin_count(grid: Grid, value: int, rows_per: int, cols_per: int) -> Grid:
    """How many cells of each bin equal `value`."""
    return bin_sums([[int(v == value) for v in row] for row in grid], rows_per, cols_per)


def level(hits: int, hottest: int) -> str:
    """The digit of a bin with `hits` recent hits when the hottest bin has `hottest` ('' without hits)."""
    if hits <= 0 or hottest <= 0:
        return ""
    return LEVELS[min(len(LEVELS), math.ceil(len(LEVELS) * hits / hottest)) - 1]


def residency(held: int, loading: int, cells: int) -> str:
    if loading:
        return LOADING
    return HELD if held >= cells else SOME if held else NONE


def _span(lo: int, hi: int) -> str:
    """A bin's label: 'lo' or 'lo-last'."""
    return str(lo) if hi - lo <= 1 else f"{lo}-{hi - 1}"


@dataclass
class HeatMap:
    text: Text
    layers_per_row: int
    experts_per_col: int
    hottest: int  # recent hits of the hottest bin (0: none, or no recent figures)
    rows: int  # map rows drawn (without the legend and the axis)
    label_w: int = 0  # a row's label takes this many columns
    cell_w: int = 1  # columns per cell: cell c of a row is its character label_w + c * cell_w


def render(state: Grid, hits: Grid | None, lookups: Grid | None, width: int, height: int | None = None,
           mode: str = "both") -> HeatMap:
    """The map of `state` (per layer x expert: 0 not held, 1 held, 2 being read) and recent `hits`/`lookups` (same
    shape; None: no recent figures yet) in at most `width` columns and, when given, `height` lines (layers binned
    into rows to fit; None: one row per layer)."""
    n_layers, n_experts = len(state), len(state[0]) if state else 0
    if not n_layers or not n_experts:
        return HeatMap(Text("(the server reports no experts)"), 1, 1, 0, 0)
    show_hits = mode in ("both", "hits") and hits is not None
    show_held = mode in ("both", "held")
    lpr = per_bin(n_layers, (height - HEADER_LINES) if height is not None else n_layers)
    row_bins = [(lo, min(lo + lpr, n_layers)) for lo in range(0, n_layers, lpr)]
    label_w = max(len(f"L{_span(lo, hi)}") for lo, hi in row_bins) + 1
    held = bin_count(state, 1, lpr, n_experts)
    total = [(hi - lo) * n_experts for lo, hi in row_bins]
    row_hits = bin_sums(hits, lpr, n_experts) if hits is not None else None
    row_looks = bin_sums(lookups, lpr, n_experts) if lookups is not None else None
    held_w = max(len(str(t)) for t in total)
    summary_w = 2 * held_w + 7  # " held/total hit%"
    room = width - label_w - summary_w
    if room < min(n_experts, 16):  # too narrow for the summary: the map alone
        room, summary_w = width - label_w, 0
    room = max(room, 1)
    epc = per_bin(n_experts, room)
    n_cols = math.ceil(n_experts / epc)
    num_w = len(str(n_experts - 1))
    cell_w = 3 if n_cols * 3 <= room and num_w <= 2 else 2 if n_cols * 2 <= room and num_w <= 1 else 1
    b_held = bin_count(state, 1, lpr, epc)
    b_loading = bin_count(state, 2, lpr, epc)
    b_hits = bin_sums(hits, lpr, epc) if show_hits and hits is not None else None
    hottest = max((max(row) for row in b_hits), default=0) if b_hits else 0

    out = Text(no_wrap=True, overflow="crop")
    what = {"both": "hits, else held", "hits": "hits only", "held": "held only"}[mode]
    binned = [f"{lpr} layers/row"] * (lpr > 1) + [f"{epc} experts/col"] * (epc > 1)
    head = f"{n_layers} layers x {n_experts} experts" + (f", binned {', '.join(binned)}" if binned else ", 1 cell each")
    out.append(_fit(f"{head}; {what}", width) + "\n", "bold")
    keys: list[tuple[str, str]] = []
    if show_held:
        keys += [(HELD, "held"), (SOME, "part held") if epc * lpr > 1 else ("", ""), (NONE, "not held"),
                 (LOADING, "loading")]
    if mode in ("both", "hits"):
        keys.append(("1-9", f"hits (9 = {hottest})" if hits is not None else "hits (after the next reading)"))
        if mode == "hits":
            keys.append((NONE, "no hit"))
    line = Text()
    for ch, say in keys:
        if ch:
            line.append(ch, STYLE.get(ch, "bold red"))
            line.append(f" {say}  ")
    line.truncate(width)
    out.append_text(line)
    out.append("\n")
    axis = [" "] * (n_cols * cell_w)
    step = max(1, math.ceil((len(str((n_cols - 1) * epc)) + 1) / cell_w))
    for c in range(0, n_cols, step):
        label = str(c * epc)
        if c * cell_w + len(label) <= len(axis):
            axis[c * cell_w:c * cell_w + len(label)] = label
    axis_text = "".join(axis).rstrip()
    out.append(" " * label_w + axis_text, "bright_black")
    if summary_w:
        out.append(" " * (n_cols * cell_w - len(axis_text)) + f"{'held':>{2 * held_w + 2}} hit%", "bright_black")
    for r, (lo, hi) in enumerate(row_bins):
        out.append("\n")
        out.append(f"L{_span(lo, hi)}".ljust(label_w), "bright_black")
        for c in range(n_cols):
            cells = (hi - lo) * (min((c + 1) * epc, n_experts) - c * epc)
            digit = level(b_hits[r][c], hottest) if b_hits else ""
            if digit:
                style = "bold red" if digit >= "7" else "magenta" if digit >= "4" else "cyan"
                out.append(digit, style)
            elif show_held:
                ch = residency(b_held[r][c], b_loading[r][c], cells)
                out.append(ch, STYLE[ch])
            else:
                out.append(NONE, STYLE[NONE])
            out.append(" " * (cell_w - 1))
        if summary_w:
            pct = "   -" if row_looks is None or not row_looks[r][0] else f"{100 * row_hits[r][0] / row_looks[r][0]:3.0f}%"
            out.append(f" {held[r][0]:>{held_w}}/{total[r]:<{held_w}} {pct}")
    if b_hits and hottest:
        hot = heapq.nlargest(8, ((h, layer, e) for layer, row in enumerate(hits or []) for e, h in enumerate(row) if h))
        names = [f"L{layer} E{e} {h:,}" for h, layer, e in hot]
        out.append("\n" + _fit("hottest experts, recent hits: " + ", ".join(names), width), "bright_black")
    return HeatMap(out, lpr, epc, hottest, len(row_bins), label_w, cell_w)


def _fit(s: str, width: int) -> str:
    return s if len(s) <= width else s[:max(0, width - 3)] + "..."
