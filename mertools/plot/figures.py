"""The figures of a routing trace, drawn with matplotlib's object API on the Agg canvas (no pyplot: no global state,
no display). Imported only when `mertools plot` draws, so the rest of mertools never needs matplotlib.

Every figure stays readable from the tiny fixture (4 layers x 8 experts, a few dozen tokens) to a real model (48
layers x 128 experts, thousands of tokens): at most MAX_PANELS layers get a routing panel, and positions are summed
into at most MAX_BINS columns.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from .read import Trace

MAX_PANELS = 8  # layers drawn in the routing figure, evenly spaced when the model has more
MAX_BINS = 400  # columns of positions: one per position up to this, else each the sum of a run of positions
MAX_ROWS = 64  # rows of experts in a routing panel: one per expert up to this, else each the sum of a few
DPI = 100
HIT, MISS, RATE = "#2a9d8f", "#e76f51", "#264653"


def _bins(tr: Trace) -> tuple[np.ndarray, int, int, int]:
    """Each record's column (R,), the number of columns, and the first and last position."""
    lo, hi = int(tr.token.min()), int(tr.token.max())
    span = hi - lo + 1
    n = min(span, MAX_BINS)
    return (tr.token - lo) * n // span, n, lo, hi


def _positions_label(n_bins: int, lo: int, hi: int) -> str:
    per = (hi - lo + 1) / n_bins
    return "token position" + (f" (each column ~{per:.3g} positions)" if per > 1 else "")


def _shown_layers(tr: Trace) -> list[int]:
    layers = np.unique(tr.layer)  # a dense layer (no experts) has no records
    if len(layers) <= MAX_PANELS:
        return layers.tolist()
    return layers[np.linspace(0, len(layers) - 1, MAX_PANELS).round().astype(int)].tolist()


def routing_figure(tr: Trace) -> Figure:
    """One panel per layer (up to MAX_PANELS): x the token position, y the expert, the colour the routing weight the
    expert got (blank: not chosen); with more positions or experts than a panel has columns or rows, a cell is the
    mean over its positions of the weight its experts got together."""
    col, n_bins, lo, hi = _bins(tr)
    layers = _shown_layers(tr)
    panel_h = 0.85 if tr.n_experts <= 16 else 1.5
    fig = Figure(figsize=(10, 0.9 + panel_h * len(layers)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0])
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    # experts summed in groups down to MAX_ROWS rows, so a panel's cell stays a few pixels high (no aliasing)
    group = -(-tr.n_experts // MAX_ROWS)
    grids = []
    for layer in layers:
        rows = tr.layer == layer
        weight = np.zeros((-(-tr.n_experts // group), n_bins))
        ok = tr.experts[rows] >= 0
        c = np.broadcast_to(col[rows][:, None], ok.shape)
        np.add.at(weight, (tr.experts[rows][ok] // group, c[ok]), tr.weights[rows][ok])
        tokens = np.bincount(col[rows], minlength=n_bins)
        grids.append(np.divide(weight, tokens, out=np.zeros_like(weight), where=tokens > 0))
    binned = hi - lo + 1 > n_bins or group > 1
    # a column of many positions averages an expert's weight over them all: scaled to the bulk of the values, not 1
    nonzero = np.concatenate([g[g > 0] for g in grids])
    vmax = float(np.percentile(nonzero, 99)) if binned and len(nonzero) else 1.0
    im = None
    for ax, layer, grid in zip(axes, layers, grids, strict=True):
        im = ax.imshow(np.ma.masked_equal(grid, 0), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0,
                       vmax=vmax, extent=(lo - 0.5, hi + 0.5, grid.shape[0] * group - 0.5, -0.5))
        ax.set_ylabel(f"layer {layer}\nexpert" + (f"s (by {group})" if group > 1 else ""), fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=min(tr.n_experts, 5), integer=True))
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel(_positions_label(n_bins, lo, hi))
    more = f" ({len(layers)} of {len(np.unique(tr.layer))} layers)" if len(layers) < len(np.unique(tr.layer)) else ""
    fig.suptitle(f"Experts chosen per layer over the tokens{more}: {tr.path.name}", fontsize=10)
    fig.colorbar(im, ax=list(axes), shrink=min(1.0, 3 / len(layers)),
                 label="routing weight" + (" (a cell's sum over its experts,\nmean over its positions)" if binned else ""))
    return fig


def frequency_figure(tr: Trace) -> Figure:
    """Layer x expert heat map: the share of a layer's tokens that chose each expert (a row sums to k)."""
    counts = tr.frequency()
    tokens = np.bincount(tr.layer, minlength=tr.n_layers)
    share = np.divide(counts, tokens[:, None], out=np.full(counts.shape, np.nan), where=tokens[:, None] > 0)
    w = float(np.clip(2.5 + 0.45 * tr.n_experts, 7, 12))
    h = float(np.clip(1.6 + 0.4 * tr.n_layers, 2.8, 9))
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#dddddd")  # grey: a layer without records
    im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0,
                   extent=(-0.5, tr.n_experts - 0.5, tr.n_layers - 0.5, -0.5))
    if tr.n_layers * tr.n_experts <= 256:  # few cells: their values are readable
        top = np.nanmax(share) if np.isfinite(share).any() else 1.0
        for (layer, expert), v in np.ndenumerate(share):
            if np.isfinite(v):
                ax.text(expert, layer, f"{v:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.55 * top else "black")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(tr.n_experts, 16), integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(tr.n_layers, 16), integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    k = tr.experts.shape[1]
    ax.set_title(f"How often each expert was chosen\n{tr.path.name}: {int(tokens.max())} tokens, top-{k} "
                 f"(a row sums to {k})", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of the layer's tokens", format=PercentFormatter(1.0, decimals=0))
    return fig


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True in mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), (np.flatnonzero(edges == -1) - 1).tolist(), strict=True))


def cache_figure(tr: Trace) -> Figure:
    """Hits and misses of the expert cache per token position (summed over the layers; bars) with the running hit
    rate (line), and, when the trace has times, the cumulative hits and misses over seconds. A prompt's positions
    are routed in batches, which look an expert up once for the batch: shaded, their per-position counts are what
    each token alone would have hit."""
    hits, misses = tr.lookups()
    col, n_bins, lo, hi = _bins(tr)
    # per position of a column (its sum over the positions it covers), so columns of unequal widths compare
    covered = np.maximum(1, np.bincount(np.unique(np.stack([col, tr.token]), axis=1)[0], minlength=n_bins))
    h = np.bincount(col, hits, minlength=n_bins) / covered
    m = np.bincount(col, misses, minlength=n_bins) / covered
    x = lo + (np.arange(n_bins) + 0.5) * (hi - lo + 1) / n_bins - 0.5
    width = (hi - lo + 1) / n_bins
    panels = 2 if tr.t is not None else 1
    fig = Figure(figsize=(10, 3.2 * panels + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(panels, 1, squeeze=False)[:, 0])
    ax = axes[0]
    ax.bar(x, h, width=width, color=HIT, label="hits", linewidth=0)
    ax.bar(x, m, width=width, bottom=h, color=MISS, label="misses", linewidth=0)
    ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_xlabel(_positions_label(n_bins, lo, hi))
    ax.set_ylabel("expert lookups per token\n(all layers)")
    if tr.t is not None:  # batch-mates share a layer's call, and so its time
        _, inv, cnt = np.unique(np.stack([tr.layer, np.round(tr.t * 1e6).astype(np.int64)]), axis=1,
                                return_inverse=True, return_counts=True)
        batched = np.bincount(col, cnt[inv.ravel()] > 1, minlength=n_bins) > 0
        for i, (a, b) in enumerate(_runs(batched)):
            ax.axvspan(x[a] - width / 2, x[b] + width / 2, color="#999999", alpha=0.18, linewidth=0,
                       label="routed as a batch (prompt)" if i == 0 else None)
    running = np.cumsum(h) / np.maximum(1, np.cumsum(h + m))  # over the positions up to each column's
    rate = ax.twinx()
    rate.plot(x, running, color=RATE, linewidth=1.6, label="running hit rate")
    rate.set_ylim(0, 1.02)
    rate.yaxis.set_major_formatter(PercentFormatter(1.0))
    rate.set_ylabel("running hit rate")
    handles = ax.get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8, ncol=4, framealpha=0.9)
    ax.set_ylim(0, max(1, float((h + m).max())) * 1.3)  # room for the legend
    total = int(hits.sum() + misses.sum())
    ax.set_title(f"Expert cache at routing time: {tr.path.name}, {int(hits.sum())} hits / {total} lookups "
                 f"({hits.sum() / max(1, total):.1%})", fontsize=10)
    if tr.t is not None:
        ax2 = axes[1]
        by_t = np.argsort(tr.t, kind="stable")
        t = tr.t[by_t]
        ax2.step(t, np.cumsum(hits[by_t]), where="post", color=HIT, label="hits")
        ax2.step(t, np.cumsum(misses[by_t]), where="post", color=MISS, label="misses")
        ax2.set_xlabel("seconds since the trace began (the engine's opening and warm-up included)")
        ax2.set_ylabel("cumulative lookups")
        ax2.legend(loc="upper left", fontsize=8)
        ax2.set_title("Over time: a steeper miss line is time spent reading experts", fontsize=9)
    return fig


def reads_figure(tr: Trace) -> Figure:
    """The store's expert reads per latency bucket (log-spaced), with the estimated p50 and p95."""
    r = tr.reads
    if r is None:
        raise ValueError(f"{tr.path}: the trace has no reads record")
    ms = r.bounds * 1e3
    nz = np.flatnonzero(r.counts)
    a, b = int(nz[0]), int(nz[-1])
    # bucket i spans (bounds[i-1], bounds[i]]; the first and last are open: drawn to the observed min and max
    left = np.concatenate(([min(r.min * 1e3, ms[0] / 1.2)], ms))[a:b + 1]
    right = np.concatenate((ms, [max(r.max * 1e3, ms[-1] * 1.2)]))[a:b + 1]
    fig = Figure(figsize=(8, 3.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(left, r.counts[a:b + 1], width=right - left, align="edge", color="#6c8ebf", edgecolor="white",
           linewidth=0.5, label="reads")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    for p, style in ((50, "-"), (95, "--")):
        v = r.percentile(p) * 1e3
        ax.axvline(v, color="black", linestyle=style, linewidth=1.2, label=f"p{p} {v:.3g} ms")
    ax.set_xlabel("read latency (ms, log scale)")
    ax.set_ylabel("expert reads")
    ax.legend(fontsize=8)
    mean = r.sum / r.count * 1e3
    ax.set_title(f"Expert read latency: {tr.path.name}, {r.count} reads, {r.bytes_read / 2**20:.1f} MiB, "
                 f"mean {mean:.3g} ms\n(every read of the run: demand, prefetch and warm-up)", fontsize=10)
    return fig


def save(fig: Figure, stem: Path, formats: Iterable[str]) -> list[Path]:
    """`fig` as stem.<format> for each format, each written to a temporary file beside it and renamed into place, so
    a failure leaves no half-written picture."""
    out = []
    for fmt in formats:
        dest = stem.with_suffix(f".{fmt}")
        # a fresh name opened exclusively, with the usual permissions (mkstemp's would be 0600)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "xb") as f:
                # no date in an SVG and fixed ids: the same trace gives the same bytes
                with matplotlib.rc_context({"svg.hashsalt": "mertools"}):
                    fig.savefig(f, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        out.append(dest)
    return out
